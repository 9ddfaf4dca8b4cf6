// The character vocabulary, as core/tokenizer.py: text <-> token ids.
//
// Ids 0-3 are the special tokens <|unk|>, <|user|>, <|bot|>, <|eot|>; the model's characters
// follow. Special tokens are ids, never text: typing "<|user|>" encodes eight characters. A
// character the model never saw goes through the same small normalisation as in Python (curly
// quotes to straight ones, dashes, ellipsis, odd spaces), used only when every replacement
// character is in the vocabulary; whatever is still unknown becomes <|unk|>.
"use strict";

const SPECIAL_TOKENS = ["<|unk|>", "<|user|>", "<|bot|>", "<|eot|>"];
const [UNK_ID, USER_ID, BOT_ID, EOT_ID] = [0, 1, 2, 3];

// Canonical form of text before it meets the vocabulary: "\n" line ends, then NFC Unicode (an
// accented letter typed as letter + combining accent becomes the precomposed one of most corpora).
function prepareText(text) {
  return text.replace(/\r\n/g, "\n").normalize("NFC");
}

class CharTokenizer {
  // chars: the vocabulary's characters in id order (from id 4); normalise: { unseen: replacement }.
  constructor(chars, normalise) {
    this.chars = chars;
    this.tokens = [...SPECIAL_TOKENS, ...chars];
    this.ids = new Map(chars.map((c, i) => [c, i + SPECIAL_TOKENS.length]));
    this.normalise = normalise;
  }

  get vocab_size() {
    return this.tokens.length;
  }

  // Text -> ids. Never fails: unseen characters are normalised or become UNK_ID. `for ... of`
  // walks code points, as Python walks a str (an emoji is one character, not two halves).
  encode(text) {
    const ids = [];
    for (const ch of prepareText(text)) {
      const id = this.ids.get(ch);
      if (id !== undefined) {
        ids.push(id);
        continue;
      }
      const replacement = this.normalise[ch];
      if (replacement !== undefined && [...replacement].every((r) => this.ids.has(r))) {
        for (const r of replacement) ids.push(this.ids.get(r));
      } else {
        ids.push(UNK_ID);
      }
    }
    return ids;
  }

  // Ids -> text; special tokens appear as their spelling, an id outside the vocabulary as <|unk|>.
  decode(ids) {
    return ids.map((i) => (i >= 0 && i < this.tokens.length ? this.tokens[i] : SPECIAL_TOKENS[UNK_ID])).join("");
  }
}
