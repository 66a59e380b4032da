"""The card (README.md) of a draft directory written by `bild distill`."""
from __future__ import annotations

from pathlib import Path


def _feature_layers(s: dict) -> str:
    layers = s["init_layers"]
    if len(layers) == 1:
        return f"one decoder layer initialised from the large model's layer {layers[0]}"
    return f"{len(layers)} decoder layers initialised from the large model's layers {layers}"


def _batch(s: dict) -> str:
    grouped = " (answers of similar lengths together)" if s.get("group_by_length") else ""
    tf32 = " (matrix products on TF32 tensor cores)" if s.get("tf32") else ""
    return f"batch {s.get('batch_size', 8)}{grouped}, float32{tf32}"


def draft_card(base_name: str, s: dict, n_held: int) -> str:
    """The README.md of a distilled draft directory, from `distill`'s stats: what it is, what it was
    trained on, how, and how often it agrees with the large model."""
    vocab = "the whole vocabulary" if s["draft_vocab"] is None else f"the {s['draft_vocab']} most frequent corpus tokens"
    warm = s.get("init_draft")
    if warm and "draft_vocab_before" in s:
        vocab = (f"the {s['draft_vocab_before']} token ids of `{Path(warm).name}` (its `draft_vocab`) and "
                 + ("every other token" if s["draft_vocab"] is None else
                    f"the {s['draft_vocab'] - s['draft_vocab_before']} most frequent corpus tokens it lacked"))
    elif warm and s["draft_vocab"] is not None:
        vocab = f"the {s['draft_vocab']} token ids of `{Path(warm).name}` (its `draft_vocab`, kept)"
    precision = ", matrix products in bfloat16 (autocast; teacher corpus and targets too)" if s.get("bf16") else ""
    hist = "\n".join(f"| {m} | {seen} | {acc:.3f} |" for m, seen, acc in s["history"]) or "| - | - | - |"
    if s.get("kind") == "feature":
        head = f"""# Feature draft for {base_name}

An EAGLE-style draft for big-little speculative decoding with bild-kernels, made by `bild distill --kind feature`.

- **Architecture**: fc(standardised large-model feature f_t, next-token embedding) -> {_feature_layers(s)} -> the
  large model's final norm and head. It
  reads the large model's last hidden state (before the final norm) at every verified position and predicts the
  next one; while chaining it feeds its own predictions back. The head scores {vocab}.
- **Data**: {_data(s)} Features from bild's executor ({'bfloat16' if s.get('bf16') else 'float32'}).
- **Objective**: smooth-L1 to the next feature (standardised) plus cross-entropy to the large model's top-32
  next-token distribution, unrolled {s['depth']} steps on the draft's own features.
- **Training**: AdamW, lr {s['lr']:g} (cosine to {s['final_lr']:g}), {_batch(s)},
  {s['minutes']:g} minutes of wall time on {_where(s)}.
"""
    else:
        head = ""
    agreement = f"""- **Agreement**: top-1 agreement with the large model's greedy continuations of {n_held} held-out
  prompts (templates and topics training never saw): {s['agreement_before']:.3f} before training,
  **{s['agreement']:.3f}** after.{_chosen(s)}

| minutes | tokens seen | held-out agreement |
|---|---|---|
{hist}
"""
    if head:
        if warm:
            before = (f"{s['agreement_before_vocab']:.3f} agreement before this run with its own head vocabulary, "
                      f"{s['agreement_before']:.3f} with the\n  grown one" if "agreement_before_vocab" in s else
                      f"{s['agreement_before']:.3f} agreement before this run")
            head += (f"- **Warm start**: the layers, input map, feature statistics and head vocabulary of "
                     f"`{Path(warm).name}`\n  (its card describes its own data and training), {before}.\n")
        return head + agreement
    start = (f"""- **Warm start**: the layers, final norm and head vocabulary of `{Path(warm).name}` (its card describes
  its own data and training), {s['agreement_before']:.3f} agreement before this run; then trained as below.
""" if warm else "")
    return f"""# Draft model for {base_name}

A draft for big-little speculative decoding with bild-kernels, made by `bild distill`.

- **Architecture**: {len(s['init_layers'])} decoder layers initialised from the large model's layers
  {s['init_layers']}, its own final norm; the large model's token embedding and LM head are borrowed at
  load time (frozen during training, not stored here). The head scores {vocab}; any other token is
  never proposed (the verifier supplies it).
{start}- **Data**: {_data(s)}
- **Objective**: cross-entropy to the large model's top-32 next-token distribution at every position.
- **Training**: AdamW, lr {s['lr']:g} (cosine to {s['final_lr']:g} over the time budget), batch {s.get('batch_size', 8)}, {s['minutes']:g} minutes of wall time on {_where(s)}{precision}.
{agreement}"""


def _chosen(s: dict) -> str:
    """Which evaluation's weights a draft holds, where it was chosen among several (a feature draft is written
    at each evaluation that beats the ones before it, so that a run cut short keeps its best)."""
    n, planned = s.get("evaluations", 1), s.get("minutes_planned")
    if n <= 1:
        return ""
    return (f" These are the weights of the best of {n} evaluations, at {s['minutes']:g}\n  of the "
            f"{planned:g} planned minutes.")


def _data(s: dict) -> str:
    k = s.get("samples_per_prompt", 1)
    what = "(instructions, summaries, translations; bild_kernels/distill/prompts.py)"
    if s.get("corpus_seed"):
        what = what[:-1] + f"; sampling seed {s['corpus_seed']})"
    n_self = s.get("self_prompts", 0)
    n_topics, n_json = s.get("topic_prompts", 0), s.get("json_prompts", 0)
    own = (f", {n_topics} more under the same templates about everyday topics from WordNet 3.0's nouns\n"
           f"  (bild_kernels/data/wordnet_topics.txt: none of them held out)" if n_topics else "")
    own += (f", {n_json} asking for JSON about such topics (bild_kernels/distill/prompts.py's JSON_TEMPLATES)"
            if n_json else "")
    n_topics += n_json
    own += (f" and {n_self} prompts it wrote itself\n  (sampled from its chat template's user-turn header, T = 1.0, "
            f"top-p 0.95; Magpie-style)" if n_self else "")
    source = " No external data set" + (" besides that list of topics." if n_topics else ".")  # (JSON's too)
    if k == 1 and s.get("corpus_planned", s["corpus_sequences"]) == s["corpus_sequences"]:
        return (f"the large model's own answers (temperature 0.7) to {s['corpus_sequences'] - n_self - n_topics} "
                f"templated chat\n  prompts {what}{own}, {s['corpus_tokens']}\n  tokens with the prompts.{_writer(s)}"
                f"{source}")
    text = (f"{s['corpus_sequences']} answers written by the large model itself (temperature 0.7"
            f"{f', {k} per prompt, a seed per pass' if k > 1 else ''}) to {s['prompts']} templated chat\n"
            f"  prompts {what}{own}, {s['corpus_tokens']} tokens with the prompts")
    if s["corpus_sequences"] < s.get("corpus_planned", 0):
        text += (f"; generation\n  stopped at its {s['corpus_minutes']:g}-minute budget, after {s['corpus_sequences']}"
                 f" of {s['corpus_planned']} answers")
    return text + f".{_writer(s)}{source}"


def _writer(s: dict) -> str:
    return " Written by bild's batch decode loop (`BatchGenerator`)." if s.get("corpus_backend") == "bild" else ""


def _where(s: dict) -> str:
    device = s.get("device", "cpu")
    return f"{s['threads']} CPU thread(s)" if device == "cpu" else f"one {device}"
