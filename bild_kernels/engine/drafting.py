"""The draft half of an engine step: who proposes each row's drafts this pass (the small model, the large
model's shallow layers, Jacobi's guesses, an n-gram lookup, or a mix), in the eager, native, fixed-buffer and graphed
draft loops.

`Drafting` is mixed into `Engine` through `Iteration` (which verifies and commits); like it, it holds no state of its
own and is split out only to keep each file readable.
"""
from __future__ import annotations

import torch

from bild_kernels import ops
from bild_kernels.engine.guiding import cut_drafts
from bild_kernels.engine.host import to_device
from bild_kernels.engine.lookup import NGramIndex
from bild_kernels.engine.penalizing import chain_penalties, head_columns, penalized
from bild_kernels.engine.policies import NGram, Policy
from bild_kernels.engine.sequence import Drafts, Sequence
from bild_kernels.engine.shallow_deep import LayerGroups

# Draft steps of one iteration use offsets iteration * DRAFT_STRIDE + step: distinct for every step.
DRAFT_STRIDE = 128


class Drafting:
    """Engine methods that make one pass's drafts (mixed into `Engine` through `Iteration`)."""

    def _head_vocab(self, running: list[Sequence]) -> torch.Tensor | None:
        """The small model's reduced head vocabulary (sorted token ids) when its eager passes may score only
        those ids: every row greedy (the argmax over them is the argmax over all, the others being -inf,
        ties going to the lowest id alike; max probability and energy are the same sums), and no
        fixed-buffer pass to serve. Sampling over V ids instead of ~6x fewer cost ~1 ms a CPU draft step.
        None: full-vocabulary logits."""
        small = self.runners["small"]
        vocab = small.executor.head_vocab
        if vocab is None or small.static is not None or any(s.params.temperature > 0 for s in running):
            return None
        return vocab

    def _head_columns(self, vocab: torch.Tensor | None) -> list[int] | None:
        """`penalizing.head_columns` of the small model's reduced head, built once."""
        if vocab is None:
            return None
        if getattr(self, "_columns", (None,))[0] is not vocab:
            self._columns = (vocab, head_columns(vocab, self.vocab_size))
        return self._columns[1]

    def _draft_caps(self, running: list[Sequence], policy: Policy, skip: frozenset[int] = frozenset()) -> list[int]:
        # Never draft past what the request may still generate: the emitted token comes on top. Rows in `skip`
        # (their drafts come from the lookup this pass) draft nothing.
        return [0 if i in skip else min(policy.max_draft_len, self._max_new(s) - len(s.output_ids) - 1)
                for i, s in enumerate(running)]

    def _lookup_tokens(self, running: list[Sequence], spec: NGram) -> list[list[int]]:
        """Each row's n-gram lookup drafts (`NGram`): up to spec.max_draft_len tokens (and what the request may
        still generate), [] where no n-gram of its tokens matches."""
        out = []
        for s, cap in zip(running, self._draft_caps(running, spec)):
            if s.ngram is None or s.ngram.sizes[0] != spec.max_ngram or s.ngram.sizes[-1] != spec.min_ngram:
                s.ngram = NGramIndex(spec.min_ngram, spec.max_ngram)
            out.append(s.ngram.propose(s.tokens, cap))
        return out

    def _lookup(self, running: list[Sequence], policy: NGram) -> Drafts:
        """NGram: no drafter; each row's drafts come from the lookup in its own tokens."""
        tokens = self._lookup_tokens(running, policy)
        return Drafts(tokens, looked_up=[bool(d) for d in tokens])

    def _draft_or_lookup(self, running: list[Sequence], policy: Policy) -> Drafts:
        """A small model's policy with `lookup`: the rows whose lookup matches take its drafts (one-hot
        distributions where speculative sampling verifies them), the small model drafts for the others."""
        tokens = self._lookup_tokens(running, policy.lookup)
        looked = [bool(d) for d in tokens]
        out = self._draft(running, policy, skip=frozenset(i for i, x in enumerate(looked) if x))
        for i, d in enumerate(tokens):
            if d:
                out.tokens[i] = d
        out.looked_up = looked
        return out

    def _guess(self, running: list[Sequence], policy: Policy) -> Drafts:
        """Jacobi: no drafter; the policy guesses each row's next tokens (carried from the last pass)."""
        return Drafts([policy.guess(s, max(c, 0)) for s, c in zip(running, self._draft_caps(running, policy))])

    def _layer_groups(self, policy: Policy) -> LayerGroups:
        if getattr(self, "_groups", None) is None or self._groups.exit_layer != policy.exit_layer:
            self._groups = LayerGroups(self.runners["large"], policy.exit_layer)
        return self._groups

    @staticmethod
    def _no_drafts(running: list[Sequence], policy: Policy) -> Drafts:
        """Empty per-row draft lists, with the distributions (speculative sampling) and the calibration
        labels (FREE) the policy needs, for a draft run to fill."""
        out = Drafts([[] for _ in running], probs=[[] for _ in running] if policy.verify_mode == "sample" else None)
        if policy.calibration is not None:
            out.confidences, out.unsure = [[] for _ in running], [None] * len(running)
        return out

    def _draft(self, running: list[Sequence], policy: Policy, skip: frozenset[int] = frozenset()) -> Drafts:
        """Autoregressive drafting by the small model, or by the large model's shallow layers (none for the
        rows in `skip`)."""
        shallow = policy.drafter == "shallow"
        if not shallow and self._static is not None:
            return self._draft_static(running, policy, skip)
        # Rows with structured outputs draft from the unmasked distribution, and a run ends at the first token its
        # pattern does not allow (discarded, as an unsure one is): in every loop the same drafts (the native and the
        # fixed-buffer loops, which run without the host, are cut after the run; `cut_drafts`).
        guides = any(s.guide is not None for s in running)
        # Rows with penalties draft from their penalised distribution (what the penalised large model keeps), in every
        # loop: this eager one, the native one, the fixed-buffer and graphed ones (_draft_static).
        penalties = any(s.params.penalized for s in running)
        key = "large" if shallow else "small"
        feature = not shallow and self.small_kind == "feature"
        out = self._no_drafts(running, policy)
        drafts = out.tokens
        caps = self._draft_caps(running, policy, skip)
        if feature:  # a feature draft starts once the large model has seen the prompt (prefill drafts nothing)
            caps = [c if s.metrics.large_passes > 0 else 0 for s, c in zip(running, caps)]
            chain_features: dict[int, torch.Tensor] = {}
        fallback_threshold = policy.thresholds()[0]
        energy = policy.fallback_signal == "energy"
        # (speculative sampling needs each draft's distribution over the whole vocabulary)
        vocab = None if shallow or out.probs is not None else self._head_vocab(running)
        active = [i for i, c in enumerate(caps) if c > 0]
        columns = self._head_columns(vocab) if penalties else None
        if (feature and self.draft_loop == "native" and active and out.probs is None
                and all(running[i].params.temperature <= 0 for i in active)
                and self._draft_native(running, active, caps, policy, out)):
            return cut_drafts(running, out) if guides else out
        fixed = None  # the rows' sampling tensors but the offsets, built once while the same rows draft
        step = 0
        while active:
            seqs = [running[i] for i in active]
            rows = [s.row for s in seqs]
            toks = [(s.tokens + drafts[i])[s.cached[key]:] for i, s in zip(active, seqs)]
            if shallow:
                logits, hidden = self._layer_groups(policy).shallow(rows, toks, [1] * len(seqs))
                for s, h in zip(seqs, hidden):
                    s.hidden.append(h)
            elif feature:
                logits = self._feature_step(active, seqs, drafts, chain_features, full_vocab=vocab is None)
            else:
                logits = self.runners["small"].extend(rows, toks, [1] * len(seqs), full_vocab=vocab is None)
            if penalties:  # (each row's drafts so far count as its output)
                logits = penalized(logits, seqs, self.eos_ids, columns=columns, drafted=[drafts[i] for i in active])
            logits = logits[:, 0]  # [n, V]
            for i, s in zip(active, seqs):
                # (a feature draft's position t reads token t + 1: it holds one position fewer than the tokens)
                s.cached[key] = len(s.tokens) + len(drafts[i]) - feature
                s.metrics.small_steps += 1
            offsets = [s.iteration * DRAFT_STRIDE + step for s in seqs]
            if fixed is None or fixed[0] != active:
                sp = self._sampling(seqs, offsets)
                fixed = (active, sp)
            else:  # the same rows as the last step: only the offsets move
                sp = {**fixed[1], "offset": to_device(offsets, torch.int64, self.device)}
            res = ops.sample_draft(logits, fallback_threshold=0.0 if energy else fallback_threshold, **sp)
            # E-LANG: a high energy -T logsumexp(z/T) marks a hard token; BiLD: a low max probability.
            unsure = (res.energies > fallback_threshold) if energy else res.fallback
            row_probs = (ops.filtered_probs(logits, sp["temperature"], sp["top_k"], sp["top_p"], sp["min_p"])
                         if out.probs else None)
            confs = res.max_probs.tolist() if out.confidences is not None else None
            still = []
            for j, (i, tok, fb) in enumerate(zip(active, drafted_ids(res, vocab).tolist(), unsure.tolist())):
                if fb:  # the drafter is unsure: its token is discarded and the large model takes over
                    running[i].metrics.fallbacks += 1
                    if confs is not None:
                        out.unsure[i] = (tok, confs[j])
                    continue
                if guides and running[i].guide is not None and \
                        running[i].guide.allowed_prefix(drafts[i] + [tok]) == len(drafts[i]):
                    continue  # (its pattern ends the run: the large model takes over)
                drafts[i].append(tok)
                if out.probs is not None:
                    out.probs[i].append(row_probs[j])
                if confs is not None:
                    out.confidences[i].append(confs[j])
                if len(drafts[i]) < caps[i]:
                    still.append(i)
            active = still
            step += 1
        if feature:  # the chain's positions hold guessed features: drop them, keep the verified ones
            chained = [(s.row, s.cached["small"] - (len(s.tokens) - 1)) for s in running]
            chained = [(r, n) for r, n in chained if n > 0]
            if chained:
                self.runners["small"].rollback([r for r, _ in chained], [n for _, n in chained])
            for s in running:
                s.cached["small"] = min(s.cached["small"], len(s.tokens) - 1)
        return out

    def _draft_native(self, running: list[Sequence], active: list[int], caps: list[int], policy: Policy,
                      out: Drafts) -> bool:
        """The drafting rows' greedy feature-draft runs in one call of the CPU extension (`draft_loop="native"`):
        the same drafts, confidences and metrics as the eager loop below. Returns False, having done nothing, where
        the extension does not serve this draft or a row's first step."""
        small = self.runners["small"]
        ex = small.executor
        seqs = [running[i] for i in active]
        counts = [_pending_features(s) for s in seqs]
        if not all(ex.chain_ready(n) for n in counts):
            return False
        starts = [s.cached["small"] for s in seqs]
        rows, row_caps = [s.row for s in seqs], [caps[i] for i in active]
        # every slot the runs may feed, reserved at once (the worst case the scheduler budgets for anyway)
        slots = small.blocks.append(rows, [n + c - 1 for n, c in zip(counts, row_caps)])
        feats = torch.cat([f for s in seqs for f in s.features])
        nxt = [t for s, st in zip(seqs, starts) for t in s.tokens[st + 1:]]
        runs = ex.draft_chain(feats, nxt, counts, starts, row_caps, small.kv_caches, slots,
                              small.blocks.block_tables_of(rows), policy.thresholds()[0],
                              policy.fallback_signal == "energy",
                              chain_penalties(seqs, self.eos_ids, self._head_columns(ex.head_vocab)))
        chained = [(r, c - 1) for r, c in zip(rows, row_caps) if c > 1]
        if chained:  # the chains' positions hold guessed features: drop them, keep the verified ones
            small.rollback([r for r, _ in chained], [n for _, n in chained])
        for i, s, run in zip(active, seqs, runs):
            s.features = []
            s.cached["small"] = len(s.tokens) - 1
            s.metrics.small_steps += run.steps
            n = len(run.tokens)
            if run.stop == "unsure":
                s.metrics.fallbacks += 1
                if out.unsure is not None:
                    out.unsure[i] = (run.unsure_token, run.max_probs[n])
            elif run.stop == "not_finite":  # as screen_logits would: the request ends with an error after the step
                small.note_nonfinite([s.row], torch.ones(1, dtype=torch.bool))
            out.tokens[i] = run.tokens
            if out.confidences is not None:
                out.confidences[i] = run.max_probs[:n]
        return True

    def _feature_step(self, active: list[int], seqs: list[Sequence], drafts: list[list[int]],
                      chain_features: dict, *, full_vocab: bool = True) -> torch.Tensor:
        """One feature-draft forward: a row with no draft yet feeds the large model's features of every
        verified position it has not seen (and the tokens after them); a row in its chain feeds its own
        predicted feature and its last draft. Returns the logits [n, 1, V] of each row's last position
        (full_vocab=False: over the draft's head vocabulary only)."""
        small = self.runners["small"]
        feats, nxt = [], []
        for i, s in zip(active, seqs):
            if drafts[i]:
                feats.append(chain_features[i][None])
                nxt.append([drafts[i][-1]])
                continue
            _pending_features(s)
            feats.append(torch.cat(s.features))
            nxt.append(s.tokens[s.cached["small"] + 1:])
            s.features = []
        ids = to_device([t for ts in nxt for t in ts], torch.int64, self.device)
        embeds = small.executor.input_embeds(torch.cat(feats).to(self.device), ids)
        logits, hidden = small.extend([s.row for s in seqs], nxt, [1] * len(seqs), return_hidden=True, embeds=embeds,
                                      full_vocab=full_vocab)
        for i, h in zip(active, hidden):
            chain_features[i] = h[-1]
        return logits

    def _draft_static(self, running: list[Sequence], policy: Policy, skip: frozenset[int] = frozenset()) -> Drafts:
        """The same draft run on the fixed buffers of `StaticDraftLoop` (CUDA graphs on a GPU)."""
        caps = self._draft_caps(running, policy, skip)
        feature = self.small_kind == "feature"
        if feature:  # as in `_draft`: nothing to draft from before the large model's prefill
            caps = [c if s.metrics.large_passes > 0 else 0 for s, c in zip(running, caps)]
        with_probs = policy.verify_mode == "sample"
        out = self._no_drafts(running, policy)
        active = [i for i, c in enumerate(caps) if c > 0]
        if not active:
            return out
        seqs = [running[i] for i in active]
        rows = [s.row for s in seqs]
        features = None
        if feature:
            chain: dict[int, torch.Tensor] = {}
            logits = self._feature_step(active, seqs, [[] for _ in running], chain)[:, 0]
            features = torch.stack([chain[i] for i in active])
        else:
            logits = self.runners["small"].extend(rows, [s.pending("small") for s in seqs], [1] * len(seqs))[:, 0]
        run = self._static.run(rows, [caps[i] for i in active], logits,
                               self._sampling_values(seqs, [s.iteration * DRAFT_STRIDE for s in seqs]),
                               policy.thresholds()[0], policy.fallback_signal == "energy", with_probs=with_probs,
                               features=features, penalties=chain_penalties(seqs, self.eos_ids, None))
        if feature:  # the chain's positions hold guessed features: drop them
            fed = [(s.row, run.fed[j]) for j, s in enumerate(seqs) if run.fed[j] > 0]
            if fed:
                self.runners["small"].rollback([r for r, _ in fed], [n for _, n in fed])
        for j, (i, s) in enumerate(zip(active, seqs)):
            s.cached["small"] = len(s.tokens) - 1 if feature else len(s.tokens) + run.fed[j]
            s.metrics.small_steps += 1 + run.fed[j]
            s.metrics.fallbacks += run.fell[j]
            out.tokens[i] = run.tokens[j]
            if with_probs:
                out.probs[i] = run.probs[j]
            if out.confidences is not None:
                out.confidences[i], out.unsure[i] = run.confidences[j], run.unsure[j]
        return cut_drafts(running, out) if any(s.guide is not None for s in running) else out


def _pending_features(s: Sequence) -> int:
    """The verified positions whose large-model features a feature draft has not been fed yet (every one from
    s.cached["small"] to the last token's)."""
    have = sum(f.shape[0] for f in s.features)
    if s.cached["small"] + have != len(s.tokens) - 1:  # an engine bug, not a user error
        raise RuntimeError(f"feature draft out of step: {s.cached['small']} fed + {have} pending features "
                           f"for {len(s.tokens)} tokens")
    return have


def drafted_ids(res, vocab: torch.Tensor | None) -> torch.Tensor:
    """The sampled token ids of `res` (an `ops.sample_draft` result), mapped through a reduced head's
    vocabulary when the logits were over it (see `Drafting._head_vocab`)."""
    return res.token_ids if vocab is None else vocab[res.token_ids]
