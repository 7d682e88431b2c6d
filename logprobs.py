"""The trainer's log-probs of sampled completions, and the micro-batches they are computed in.

    pack_groups          each prompt once with its completions packed behind it, and the segment ids from which the
                         model builds the block mask between them on the device
    completion_logprobs  log pi(o_t | q, o_<t) from logits / temperature, through the fused log-prob kernel
    micro_batches        rows -> micro-batches with the prompts they need; same_count pads the count over ranks

The sampler's own log-probs of the same tokens come from sampler.py; the loss that uses both is in grpo.py.
"""

import torch
import torch.nn.functional as F

from distributed import all_reduce_max
from kernels import fused_linear_logprobs

# ----------------------------------------------------------------------------------------------------------------
# Log-probs of completions, the prompt run once per group: the scorer's twin of the sampler's prefill-once.
# Each prompt and the inputs of its completions go side by side into one packed sequence with a block mask,
#
#     [ q_0 .. q_{L-1} | o^1_0 .. o^1_{m_1-2} | o^2_0 .. o^2_{m_2-2} | ... ]      (o^r_{m_r-1}, the last token of a
#                                                                                  row, predicts nothing: not an input)
#
# where a completion token sees the whole prompt and the earlier tokens of its own completion, at positions L, L+1,
# ... as if it followed the prompt alone. Same numbers as G separate sequences (tested), with the prompt computed
# once, no padding inside a row and no key/value copies; gradients reach the prompt's keys and values from every
# completion through the one packed forward.


def pack_groups(prompts, comp_ids, lengths, rows_prompt, pad_id=0):
    """prompts: P token lists; comp_ids (R, M); lengths (R,) real tokens per row; rows_prompt (R,) prompt of each row.
    -> ids (P, S), positions (P, S), segment ids (P, S) (0 the prompt, r + 1 row r's tokens, -1 padding: the block
    mask is model.packed_attention_mask of them, built where they are), index (R, M) into the flattened (P * S)
    outputs: the position whose output predicts completion token t of row r (0 where t >= lengths[r])."""
    R, M = comp_ids.shape
    seqs, segs, poss = [], [], []
    index = torch.zeros(R, M, dtype=torch.long)
    for p, prompt in enumerate(prompts):
        L = len(prompt)
        ids, seg, pos = list(prompt), [0] * L, list(range(L))
        for r in (rows_prompt == p).nonzero().flatten().tolist():
            m = int(lengths[r])
            if m == 0:
                continue
            start = len(ids)
            ids += comp_ids[r, : m - 1].tolist()  # inputs o_0 .. o_{m-2}
            seg += [r + 1] * (m - 1)  # segment r + 1: this row's own tokens
            pos += list(range(L, L + m - 1))
            index[r, 0] = L - 1  # the last prompt token predicts o_0
            index[r, 1:m] = torch.arange(start, start + m - 1)  # o_{t-1} predicts o_t
        seqs.append(ids), segs.append(seg), poss.append(pos)
    S = max(len(x) for x in seqs)
    pad = lambda rows, v: torch.tensor([x + [v] * (S - len(x)) for x in rows])
    ids, seg, pos = pad(seqs, pad_id), pad(segs, -1), pad(poss, 0)  # (P, S) each; seg -1 = padding
    for p in range(len(prompts)):
        index[rows_prompt == p] += p * S
    index[torch.arange(M)[None, :] >= lengths[:, None]] = 0
    return ids, pos, seg, index


def completion_logprobs(model, prompts, comp_ids, comp_mask, rows_prompt, temperature, return_entropy=False):
    """log pi(o_t | q, o_<t) for every completion token, from logits / temperature.

    prompts     list of P token lists (the distinct prompts of this micro-batch)
    comp_ids    (R, M) completions; comp_mask (R, M) 1 up to and including the first EOS
    rows_prompt (R,) index into prompts of each row
    -> logp (R, M) float32 (0 where masked) [, entropy (R, M) float32 detached]
    """
    device = comp_ids.device
    R, M_full = comp_ids.shape
    # positions after the longest completion of this micro-batch are padding: causal attention lets us cut them
    M = max(1, int(comp_mask.sum(1).max().item()))
    comp_ids, comp_mask = comp_ids[:, :M], comp_mask[:, :M]
    labels = comp_ids.masked_fill(comp_mask == 0, -100).reshape(-1)  # ignored rows give 0 and no gradient
    # the log-probs are taken inside forward, where a sharded (FSDP) model holds its gathered output weight
    logprobs = lambda hidden, w: fused_linear_logprobs(
        hidden.reshape(R * M, -1), w, labels, temperature=temperature, return_entropy=return_entropy
    )
    # packed on the host from small (P, S) and (R, M) tensors; the (P, 1, S, S) mask is built on the device
    ids, pos, seg, index = pack_groups(prompts, comp_ids.cpu(), comp_mask.sum(1).cpu(), rows_prompt.cpu())
    index = index.to(device)
    out = model(
        ids.to(device),
        position_ids=pos.to(device),
        segment_ids=seg.to(device),
        head=lambda h, w: logprobs(h.reshape(-1, h.shape[-1])[index], w),  # h (P, S, H) -> (R, M, H)
    )
    pad = lambda x: F.pad(x.view(R, M), (0, M_full - M))  # back to (R, M_full)
    if return_entropy:
        return pad(out[0]), pad(out[1])
    return pad(out)


def micro_batches(rows, micro_batch, group_size):
    """Split row indices (rows of group g are g*G .. g*G+G-1) into chunks of at most micro_batch rows, each with the
    arguments completion_logprobs needs: -> list of (rows, prompt indices, row -> local prompt index). A group may
    straddle two chunks: its prompt is then run in both (still exact)."""
    chunks = []
    for s in range(0, len(rows), micro_batch):
        r = rows[s : s + micro_batch]
        pids = sorted({i // group_size for i in r})
        local = {p: j for j, p in enumerate(pids)}
        chunks.append((r, pids, torch.tensor([local[i // group_size] for i in r])))
    return chunks


def same_count(chunks):
    """Micro-batches as (rows, prompt ids, row -> prompt, weight), padded to the largest count over the ranks with
    weight-0 copies: under FSDP every forward and backward is a collective, so every rank must run as many."""
    n = int(all_reduce_max(torch.tensor(len(chunks))).item())
    pad = chunks[-1] if chunks else ([0], [0], torch.tensor([0]))  # row 0 of the batch, its mask zeroed
    return [(*c, 1.0) for c in chunks] + [(*pad, 0.0)] * (n - len(chunks))
