"""Tests for ``minigpt2.training.samples``: what the model says at each evaluation.

A run writes ``samples.jsonl`` (step, val_loss, prompt, text) at its evaluations, the same for the
same run, shown under the progress bar; ``--no-samples`` writes none; the default prompts come from
the validation split (first user messages of a dialogue corpus, the first line of a text); the
share of time spent sampling is bounded; a resumed run keeps only the samples up to its step.
Run with ``pytest tests/training/test_samples.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers_train import main, prepare, tiny, train_args
from minigpt2 import data
from minigpt2.core.tokenizer import CharTokenizer
from minigpt2.training import trainer as train
from minigpt2.training.samples import MAX_SHARE, SampleWriter, default_prompts


def _samples(run: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def test_a_run_writes_what_the_model_says_at_its_evaluations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = prepare(tmp_path)
    rc, _, err = main(capsys, *train_args(data_dir, tmp_path / "run", "--max-iters", 6, "--eval-interval", 2))
    assert rc == 0
    samples = _samples(tmp_path / "run")
    assert samples and {tuple(s) for s in samples} == {("step", "val_loss", "prompt", "text")}
    assert samples[0]["step"] == 2 and {s["step"] for s in samples} <= {2, 4, 6}
    dataset = data.load(data_dir)
    first_line = dataset.tokenizer.decode(dataset.val[:200].tolist()).lstrip()
    assert samples[0]["prompt"] == first_line.split("\n")[0].strip()[:40]
    assert all(isinstance(s["text"], str) and s["text"] for s in samples)
    assert f"{samples[0]['prompt'][:30]!r} -> " in err  # under the progress bar
    # The same run again: the same samples (seeded), where both sampled.
    assert (
        main(capsys, *train_args(data_dir, tmp_path / "again", "--max-iters", 6, "--eval-interval", 2))[0]
        == 0
    )
    again = {(s["step"], s["prompt"]): s["text"] for s in _samples(tmp_path / "again")}
    assert all(again.get((s["step"], s["prompt"]), s["text"]) == s["text"] for s in samples)
    assert main(capsys, *train_args(data_dir, tmp_path / "quiet", "--max-iters", 4, "--no-samples"))[0] == 0
    assert not (tmp_path / "quiet" / "samples.jsonl").exists()


def test_given_prompts_and_the_time_share(tmp_path: Path) -> None:
    data_dir = prepare(tmp_path)
    model_cfg, cfg = tiny(sample_prompts="The river|A dog", max_iters=4, eval_interval=2)
    train.train(data_dir, tmp_path / "run", model_cfg, cfg)
    assert [s["prompt"] for s in _samples(tmp_path / "run")[:2]] == ["The river", "A dog"]
    writer = SampleWriter(
        tmp_path / "run", cfg, data.load(data_dir).tokenizer, np.zeros(10, np.uint16), "text"
    )
    assert writer.due(0.0)  # the first evaluation always samples
    writer.spent = 1.0
    assert not writer.due(1.0 / MAX_SHARE - 1) and writer.due(1.0 / MAX_SHARE + 1)
    writer.keep_until(2)  # a run resumed from step 2 drops what came after
    assert {s["step"] for s in _samples(tmp_path / "run")} == {2}


def test_default_prompts_of_a_dialogue_are_its_first_user_messages() -> None:
    tok = CharTokenizer(sorted(set("Hello there How are you Thanks?!")))
    turns = [["Hello there", "Hi"], ["How are you?", "Fine"], ["Hello there", "Again"], ["Thanks!", "Ok"]]
    ids = np.array([i for t in turns for i in data.encode_dialogue(tok, t)], dtype=np.uint16)
    assert default_prompts(ids, tok, dialogue=True) == ["Hello there", "How are you?", "Thanks!"]
