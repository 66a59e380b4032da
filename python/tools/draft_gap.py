"""Where a feature draft's held-out gap lies: its agreement on four prompt sets that differ in what training saw.

The shipped feature draft agrees more with the large model on training prompts' continuations than on held-out
ones. A held-out prompt differs in its template and its topic; this scores the draft on n prompts of each mix:

- `train`: a training template with a training topic (prompts of `all_train_prompts`);
- `new-topic`: a training template with an unseen WordNet topic (`topic_prompts`, as `bild distill --topic-prompts`);
- `new-template`: a held-out template with a training topic (never a training prompt);
- `held-out`: the held-out set itself (`bench/data/corpus_eval_smollm2-135m-instruct.pt`, the cards' references).

Each set's references are the large model's greedy continuations (float32, HF generate, 64 tokens, as the
held-out references); the measure is `feature_agreement` (d1: top-1 agreement at every response position; acc_2:
tokens a chain of two drafts gets accepted) beside the share of response tokens outside the draft's head vocabulary,
which it can never propose, and d1 with the same weights scoring the whole vocabulary. Usage:

    python python/tools/draft_gap.py [--draft DIR] [--n 59] [--threads 2]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def prompt_sets(n: int, seed: int = 0, trained_topics: set[str] = frozenset()) -> dict[str, list[str]]:
    from bild_kernels.distill import prompts as P
    rng = random.Random(seed)
    train_topics = P.TRAIN_TOPICS + P.MORE_TRAIN_TOPICS + P.EXTRA_TRAIN_TOPICS
    templates = P.TRAIN_TEMPLATES + P.MORE_TRAIN_TEMPLATES + P.EXTRA_TRAIN_TEMPLATES
    train = set(P.all_train_prompts())
    seen = [t.format(t=topic) for t in templates for topic in train_topics]
    seen = [p for p in seen if p in train]
    new_template = sorted({t.format(t=topic) for t in P.EVAL_TEMPLATES for topic in train_topics} - train)
    return {"train": rng.sample(seen, n), "new-topic": P.topic_prompts(n, seed=seed + 1, skip_topics=trained_topics),
            "new-template": rng.sample(new_template, n)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", type=Path,
                    default=ROOT / "bild_kernels" / "data" / "smollm2-135m-instruct-feature-draft")
    ap.add_argument("--n", type=int, default=59, help="prompts per set (default 59, as the held-out set)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trained-topics", default=None, metavar="N:SEED",
                    help="a draft trained with --topic-prompts N --corpus-seed SEED: its new-topic set leaves out the "
                         "topics those prompts name")
    args = ap.parse_args(argv)
    import torch

    from bild_kernels.distill.corpus import chat_ids, generate_corpus
    from bild_kernels.distill.feature_draft import FeatureDraft, feature_agreement, teacher_features
    from bild_kernels.distill.pipeline import _teacher
    from bild_kernels.distill.prompts import held_out_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, tok, _ = _teacher(None)
    draft = FeatureDraft.from_dir(args.draft, teacher)
    trained = set()
    if args.trained_topics:
        from bild_kernels.distill.prompts import topic_prompt_topics, tune_topics
        n, seed = (int(x) for x in args.trained_topics.split(":"))
        trained = topic_prompt_topics(n, seed, skip_topics=tune_topics())  # (as `bild distill` draws them)
    sets = prompt_sets(args.n, args.seed, trained)
    held = torch.load(ROOT / "bench" / "data" / "corpus_eval_smollm2-135m-instruct.pt")
    print(f"draft {args.draft.name}, {args.n} prompts a set (held-out: all {len(held)})", flush=True)
    print("| set | example | response tokens | outside the head | d1 | d2 | acc_2 | d1, whole vocabulary |\n"
          "|---|---|---|---|---|---|---|---|")
    head = set() if draft.vocab is None else set(draft.vocab.tolist())
    for name, prompts in list(sets.items()) + [("held-out", held_out_prompts())]:
        t = time.perf_counter()
        ids = held if name == "held-out" else generate_corpus(teacher, tok, prompts, max_new_tokens=64,
                                                              temperature=0.0, backend="hf", log=lambda s: None)
        pairs = [(x, len(chat_ids(tok, p))) for p, x in zip(prompts, ids)]
        feats = teacher_features(teacher, [x for x, _ in pairs], log=lambda s: None)
        r = feature_agreement(draft, feats, pairs, depth=2, max_k=2)
        own, draft.vocab = draft.vocab, None  # the same weights scoring every token: what the head's choice costs
        whole = feature_agreement(draft, feats, pairs, depth=1, max_k=1)["d1"]
        draft.vocab = own
        response = [t for x, n in pairs for t in x[n:]]
        outside = sum(t not in head for t in response) / len(response) if head else 0.0
        print(f"| {name} | {prompts[0]!r} | {r['n_d1']} | {outside:.3f} | {r['d1']:.3f} | "
              f"{r.get('d2', float('nan')):.3f} | "
              f"{r.get('acc_2', float('nan')):.3f} | {whole:.3f} |", flush=True)
        print(f"  ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
