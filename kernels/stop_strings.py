"""The sampler's stop strings, matched on token ids on the device, so its loop decodes nothing and copies nothing
to the host for them. Tested against decoding each row's tokens and searching the text (tests/test_model.py)."""

import weakref

import torch


class StopStrings:
    """Stop strings matched on token ids, on the device, with no decoding in the sampling loop. For each stop string
    s (n characters) a row keeps the set of j < n such that its text so far ends with s[:j], as a (B, n) boolean
    state. A new token with text p completes s if s is inside p or p starts with s[j:] for a kept j; the new set is
    {j + len(p) : p = s[j : j + len(p)]} plus the j for which p itself ends with s[:j]. Those four facts per token
    and j are looked up in tables built once per tokenizer from each token id decoded alone, so the rows stop where
    decoding them would stop as long as token texts concatenate (byte-level BPE: Llama 3, Qwen, SmolLM)."""

    # tokenizer -> {(stop strings, vocabulary, device): tables}: built once per tokenizer, and dropped with it
    _tables = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer, stop_strings, vocab_size, rows, device):
        key = (tuple(stop_strings), vocab_size, str(device))
        built = StopStrings._tables.setdefault(tokenizer, {})
        if key not in built:
            ids = [[v] for v in range(vocab_size)]
            texts = (tokenizer.batch_decode(ids, skip_special_tokens=False) if hasattr(tokenizer, "batch_decode")
                     else [tokenizer.decode(i, skip_special_tokens=False) for i in ids])  # fmt: skip
            built[key] = [stop_string_tables(texts, s, device) for s in stop_strings]
        self.tables = built[key]
        self.state = [torch.zeros(rows, len(s), dtype=torch.bool, device=device) for s in stop_strings]

    def step(self, tok):
        """Advance every row by its new token tok (B,) -> (B,) True where a stop string ends in this token."""
        hit = torch.zeros(tok.shape, dtype=torch.bool, device=tok.device)
        for i, (inside, finish, extend, begin, length) in enumerate(self.tables):
            state = self.state[i]  # (B, n)
            hit |= inside[tok] | (state & finish[tok]).any(-1)
            moved = state & extend[tok]  # matches that p continues without completing
            shift = (
                torch.arange(state.shape[1], device=tok.device) - length[tok][:, None]
            )  # (B, n): j' - len(p)
            self.state[i] = moved.gather(1, shift.clamp(min=0)) & (shift >= 0) | begin[tok]
        return hit

    def select_rows(self, rows):
        self.state = [s[rows] for s in self.state]


def stop_string_tables(texts, s, device):
    """For one stop string s (n characters) and the text p of every token: inside (V,) s in p; and per j < n, (V, n)
    each: finish p starts with s[j:], extend p = s[j : j + len(p)], begin p ends with s[:j] (all False at j = 0);
    length (V,) len(p)."""
    n, V = len(s), len(texts)
    pairs = {"finish": [], "extend": [], "begin": []}  # the (v, j) entries that are True
    chars = set(s)
    for v, p in enumerate(texts):
        if (
            p and p[0] not in chars and p[-1] not in chars
        ):  # shares no first or last character with s: no entry
            continue
        for j in range(1, n):
            if p.startswith(s[j:]):
                pairs["finish"].append((v, j))
            if s.startswith(p, j):  # when p reaches the end of s the state j + len(p) = n is not kept
                pairs["extend"].append((v, j))
            if j <= len(p) and p.endswith(s[:j]):
                pairs["begin"].append((v, j))
    flags = {k: torch.zeros(V, n, dtype=torch.bool) for k in pairs}
    for k, vj in pairs.items():
        if vj:
            flags[k][tuple(torch.tensor(vj).T)] = True
    inside = torch.tensor([s in p for p in texts], dtype=torch.bool)
    length = torch.tensor([len(p) for p in texts])
    return [t.to(device) for t in (inside, flags["finish"], flags["extend"], flags["begin"], length)]
