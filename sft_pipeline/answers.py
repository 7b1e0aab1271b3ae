"""A generation metric: does the model give the held-out reply, and does it end its turn?

Each conversation's last assistant turn is the reference. The model answers greedily after the earlier turns (the
prompt is the conversation up to that turn, templated as in training, with the assistant header), and the reply
counts as a match when it equals the reference after normalizing: lower case, punctuation and extra whitespace
removed ("The sky is blue." == "the sky is blue"). The synthetic set's answers are exact (a colour, a sound, the
words repeated, a count), so a match is a right answer in the right form.

The pirate persona's wrapper ("Arr, the sky is blue. Matey!") is part of the reference where the conversation has
the pirate system message, so it counts: a reply without it does not match there, and a reply with it does not
match elsewhere. Following the system message is part of what fine-tuning teaches.

``ends_turn`` is the share of replies that produced the end-of-turn token within ``max_new_tokens``: a model that
never stops (the pad = eos bug masks the end of turn out of the loss) scores near 0 however good its text is.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("sft_pipeline.answers")
BATCH = 16  # replies generated together (left-padded): one forward pass per new token for the whole batch


def normalize(text: str) -> str:
    """Lower case, punctuation replaced by spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def answer_metrics(model, tok, conversations: list[list[dict]], *, max_new_tokens: int, device: str,
                   end_token_id: int) -> dict:
    """Greedy replies to each conversation's turns before its last assistant turn, scored against that turn.

    Returns ``{"match": share, "ends_turn": share, "replies": [text, ...]}`` (shares in [0, 1]).
    """
    prompts, refs = [], []
    for i, conv in enumerate(conversations):
        last = max((j for j, m in enumerate(conv) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError(f"conversation {i} has no assistant turn to score against")
        prompts.append(tok.apply_chat_template(conv[:last], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])
        refs.append(conv[last]["content"])
    out = generate_replies(model, tok, prompts, device=device, end_token_id=end_token_id,
                           max_new_tokens=max_new_tokens, do_sample=False)
    replies, ended = [text for text, _ in out], [stopped for _, stopped in out]
    n = len(refs) or 1
    return {"match": sum(normalize(r) == normalize(a) for r, a in zip(replies, refs)) / n,
            "ends_turn": sum(ended) / n, "replies": replies}


def generate_replies(model, tok, prompts: list[list[int]], *, device: str, end_token_id: int,
                     batch_size: int = BATCH, **generate_kwargs) -> list[tuple[str, bool]]:
    """A reply to each tokenized prompt, generated ``batch_size`` prompts at a time (left-padded: every prompt ends
    where generation starts). Returns ``(text up to the end token, whether the end token came)`` per prompt, in order.
    A caller that samples seeds the generator before the call: the draws depend on the batch, not on one prompt."""
    import torch

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else end_token_id
    replies = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=end_token_id, pad_token_id=pad_id,
                                 **generate_kwargs)
        for row in out[:, width:].tolist():
            stop = row.index(end_token_id) if end_token_id in row else None
            replies.append((tok.decode(row[:stop], skip_special_tokens=True).strip(), stop is not None))
    return replies


def generation_metrics(peft_model, tok, messages_file: str | Path, *, samples: int, max_new_tokens: int,
                       device: str, base: dict | None = None) -> tuple[dict, dict | None]:
    """The evaluate stage's call: base (adapter disabled) and tuned on the first ``samples`` test conversations.

    ``messages_file`` is the format stage's ``<split>.messages.parquet`` (the conversations exactly as they were
    tokenized, system message included). ``base``: the base model's answers from an earlier run with the same base,
    conversations and settings (``answer_metrics``' dict), used instead of generating them again.
    Returns ``({"generation": {"base": {...}, "tuned": {...}, "samples": n}}`` to merge into metrics.json, the base's
    answers with their replies)``, or ``({}, None)`` when ``samples`` is 0.
    """
    if samples <= 0:
        return {}, None
    import pyarrow.parquet as pq

    convs = pq.read_table(str(messages_file), columns=["messages"]).slice(0, samples).column(0).to_pylist()
    kwargs = dict(max_new_tokens=max_new_tokens, device=device, end_token_id=tok.eos_token_id)
    was_training = peft_model.training
    peft_model.eval()
    tuned = answer_metrics(peft_model, tok, convs, **kwargs)
    if base is None:
        with peft_model.disable_adapter():
            base = answer_metrics(peft_model, tok, convs, **kwargs)
    peft_model.train(was_training)
    for conv, b, t in list(zip(convs, base["replies"], tuned["replies"]))[:3]:
        log.debug("reference %r | base %r | tuned %r", conv[-1]["content"], b, t)
    return {"generation": {"base": {k: base[k] for k in ("match", "ends_turn")},
                           "tuned": {k: tuned[k] for k in ("match", "ends_turn")}, "samples": len(convs)}}, base
