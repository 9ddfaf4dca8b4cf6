// The chatbot, as core/chat.py: turn templates, trimming the history to the context window, and
// the rules of an answer (stop ids, at least one character, stop strings, no whitespace at the
// ends). The page keeps the conversation and sends it whole with each question; nothing here
// remembers anything between answers.
"use strict";

// Python's str.strip() whitespace (str.isspace), which differs from JavaScript's trim() in a few
// characters (U+001C-U+001F and U+0085 are whitespace to Python; U+FEFF is not).
const PY_SPACE = "\\t-\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const LEADING_SPACE = new RegExp("^[" + PY_SPACE + "]+");
const TRAILING_SPACE = new RegExp("[" + PY_SPACE + "]+$");
const lstrip = (text) => text.replace(LEADING_SPACE, "");
const rstrip = (text) => text.replace(TRAILING_SPACE, "");

// Turns marked with the tokenizer's special tokens: <|user|>text<|eot|> and <|bot|>text<|eot|>;
// the prompt ends with <|bot|>, and the answer ends at <|eot|>.
class DialogueTemplate {
  constructor(spec) {
    this.stop_strings = spec.stop_strings;
    this.stop_ids = spec.stop_ids;
  }

  turnIds(turn, tok) {
    return [turn.role === "user" ? USER_ID : BOT_ID, ...tok.encode(turn.text), EOT_ID];
  }

  replyPrefix(tok) {
    return [BOT_ID];
  }
}

// Turns as speeches in a play: "NAME." on its own line, the text, then a blank line; the prompt
// ends with the bot's speaker line, and the answer ends where the next speech would begin.
class PlayTemplate {
  constructor(spec) {
    Object.assign(this, spec);  // user_name, bot_name, speaker_end, stop_strings, stop_ids
  }

  speaker(role) {
    return (role === "user" ? this.user_name : this.bot_name) + this.speaker_end + "\n";
  }

  turnIds(turn, tok) {
    return tok.encode(this.speaker(turn.role) + rstrip(lstrip(turn.text)) + "\n\n");
  }

  replyPrefix(tok) {
    return tok.encode(this.speaker("bot"));
  }
}

function makeTemplate(spec) {
  if (spec.name === "dialogue") return new DialogueTemplate(spec);
  if (spec.name === "play") return new PlayTemplate(spec);
  throw new Error("unknown chat template " + spec.name);
}

// The prompt ids for the bot's next answer, at most `budget` long. Whole turns are dropped, oldest
// first, until the rest fits. Only when the newest message alone is too long is it cut, keeping
// its end (the part the answer should follow).
function buildPrompt(history, template, tok, budget) {
  const prefix = template.replyPrefix(tok);
  const turns = history.map((turn) => template.turnIds(turn, tok));
  const kept = [];
  let used = prefix.length;
  for (const ids of turns.reverse()) {
    if (used + ids.length > budget) {
      if (kept.length === 0) kept.push(budget > used ? ids.slice(ids.length - (budget - used)) : []);
      break;
    }
    kept.push(ids);
    used += ids.length;
  }
  return [...kept.reverse().flat(), ...prefix];
}

// The stream of pieces without whitespace at its start or end: leading whitespace is dropped, and
// trailing whitespace is held back until something visible follows it.
async function* stripEnds(pieces) {
  let started = false, pending = "";
  for await (let piece of pieces) {
    if (!started) {
      piece = lstrip(piece);
      started = piece.length > 0;
    }
    const body = rstrip(piece);
    if (body) {
      yield pending + body;
      pending = "";
    }
    pending += piece.slice(body.length);
  }
}

class Chatbot {
  // model: a GPT; tok: a CharTokenizer; template: a template spec; reply_room: the window's share
  // kept free for the start of the answer, so it is not written into a window that must slide.
  constructor(model, tok, template, reply_room) {
    this.model = model;
    this.tokenizer = tok;
    this.template = makeTemplate(template);
    this.reply_room = reply_room;
  }

  // Yield the bot's next turn after `history` ([{role, text}]), piece by piece. sample: the
  // sampling options (CHAT_SAMPLE's names); info is filled in as the answer streams.
  async* answer(history, sample, { random, signal, info }) {
    const budget = this.model.config.block_size - this.reply_room;
    const prompt = buildPrompt(history, this.template, this.tokenizer, Math.max(1, budget));
    info.prompt_tokens = prompt.length;
    info.completion_tokens = 0;
    info.finish_reason = "stop";
    const ids = generateIds(this.model, prompt, sample, {
      stopIds: this.template.stop_ids, random, minNewTokens: 1, signal,
    });
    async function* counted() {
      for await (const id of ids) {
        info.completion_tokens += 1;
        yield id;
      }
      if (signal && signal.aborted) info.finish_reason = "stopped";
      // The model ran to the limit (rather than choosing to end its turn).
      else if (info.completion_tokens >= sample.max_new_tokens) info.finish_reason = "length";
    }
    const pieces = decodeStream(counted(), this.tokenizer, {
      stopStrings: this.template.stop_strings, skipIds: [UNK_ID],
    });
    yield* stripEnds(pieces);
  }
}
