"""No-cache, full-recompute greedy decoding: the slow oracle the fast sampler is tested against.

Deliberately independent of sampler.py: every step runs the whole sequence through the
model without a cache and masks the same ids, so a cache, position or padding bug in the
fast path shows up as a token mismatch.
"""

from __future__ import annotations

from typing import Sequence

import torch


@torch.inference_mode()
def reference_greedy(model, input_ids: torch.Tensor, max_new_tokens: int, *,
                     attention_mask: torch.Tensor | None = None, suppress_ids: Sequence[int] = (),
                     eos_token_id: int | None = None, pad_token_id: int = 0, **model_kwargs) -> torch.Tensor:
    """(B, T) left-padded prompts -> (B, <= max_new_tokens) greedy ids, recomputing everything.

    `model_kwargs` (e.g. pixel_values, image_grid_thw) go to every forward.
    """
    B = input_ids.shape[0]
    ids = input_ids.clone()
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.clone().long()
    suppress = torch.as_tensor(list(suppress_ids), dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    new = []
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=pos, **model_kwargs).logits[:, -1].float()
        if len(suppress):
            logits[:, suppress] = float("-inf")
        tok = logits.argmax(-1)
        new.append(torch.where(done, torch.full_like(tok, pad_token_id), tok))
        if eos_token_id is not None:
            done = done | (tok == eos_token_id)
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if bool(done.all()):
            break
    return torch.stack(new, 1) if new else ids[:, :0]
