"""One iteration of the engine over its running batch: draft, verify, commit.

`Iteration` is the half of `Engine` that steps: it holds no state of its own (the runners, the
sequences and the time split are the engine's) and is split out only to keep each file readable.
The loop is described at the top of `bild_kernels/engine/engine.py`.
"""
from __future__ import annotations

import time

import torch

from bild_kernels import ops
from bild_kernels.engine.calibration import labelled_pairs
from bild_kernels.engine.host import to_device
from bild_kernels.engine.lookup import NGramIndex
from bild_kernels.engine.policies import NGram, Policy
from bild_kernels.engine.runner import forget_nonfinite, nonfinite_flags
from bild_kernels.engine.sequence import Drafts, Sequence
from bild_kernels.engine.shallow_deep import LayerGroups

# Draft steps of one iteration use offsets iteration * _DRAFT_STRIDE + step: distinct for every step.
_DRAFT_STRIDE = 128


class Iteration:
    """Engine methods that run one step over the running batch (mixed into `Engine`)."""

    @staticmethod
    def _sampling_values(seqs: list[Sequence], offsets: list[int]) -> dict:
        """The rows' sampling parameters as host lists (what the static draft loop copies over in one go)."""
        return dict(temperature=[s.params.temperature for s in seqs], top_k=[s.params.top_k for s in seqs],
                    top_p=[s.params.top_p for s in seqs], seed=[s.params.seed for s in seqs], offset=offsets)

    def _sampling(self, seqs: list[Sequence], offsets: list[int]) -> dict:
        """The same on the device: two host-to-device copies (the float and the integer fields), not five; with
        what the host knows of the rows (the ops' `sampled` / `filtered`: kernels for neither kind are skipped)."""
        v, dev = self._sampling_values(seqs, offsets), self.device
        floats = to_device([v["temperature"], v["top_p"]], torch.float32, dev)
        ints = to_device([v["top_k"], v["seed"], v["offset"]], torch.int64, dev)
        return dict(temperature=floats[0], top_k=ints[0].to(torch.int32), top_p=floats[1], seed=ints[1],
                    offset=ints[2], sampled=any(t > 0 for t in v["temperature"]),
                    filtered=any(k > 0 for k in v["top_k"]) or any(p < 1.0 for p in v["top_p"]))

    def _step(self, running: list[Sequence], policy: Policy) -> list[list[int]]:
        """One iteration over the running batch; returns the tokens committed per sequence."""
        t0 = time.perf_counter()
        if policy.uses_small and not policy.drafts:
            committed = self._step_small_only(running)
            self.time_split["draft"] += time.perf_counter() - t0
            return committed
        if not policy.drafts:
            drafts = Drafts([[] for _ in running])
        elif self.draft_max_batch is not None and len(running) > self.draft_max_batch:
            drafts = self._no_drafts(running, policy)  # a plain large-model step (Engine's draft_max_batch)
        elif policy.drafter == "guess":
            drafts = self._guess(running, policy)
        elif policy.drafter == "lookup":
            drafts = self._lookup(running, policy)
        elif policy.lookup is not None:
            drafts = self._draft_or_lookup(running, policy)
        else:
            drafts = self._draft(running, policy)
        t1 = time.perf_counter()
        committed = self._verify(running, policy, drafts)
        self.time_split["draft"] += t1 - t0
        self.time_split["verify"] += time.perf_counter() - t1
        return committed

    def _step_small_only(self, running: list[Sequence]) -> list[list[int]]:
        small = self.runners["small"]
        vocab = self._head_vocab(running)
        logits = small.extend([s.row for s in running], [s.pending("small") for s in running], [1] * len(running),
                              full_vocab=vocab is None)
        for s in running:
            s.cached["small"] = len(s.tokens)
            s.metrics.small_steps += 1
        res = ops.sample_draft(logits[:, 0], **self._sampling(running, [s.iteration for s in running]))
        new = [[t] for t in _token_ids(res, vocab).tolist()]
        for s, t in zip(running, new):
            s.tokens += t
            s.iteration += 1
        return new

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
        key = "large" if shallow else "small"
        feature = not shallow and self.small_kind == "feature"
        out = self._no_drafts(running, policy)
        drafts = out.tokens
        caps = self._draft_caps(running, policy, skip)
        if feature:  # a feature draft starts once the large model has seen the prompt (prefill drafts nothing)
            caps = [c if s.cached["large"] > 0 else 0 for s, c in zip(running, caps)]
            chain_features: dict[int, torch.Tensor] = {}
        fallback_threshold = policy.thresholds()[0]
        energy = policy.fallback_signal == "energy"
        # (speculative sampling needs each draft's distribution over the whole vocabulary)
        vocab = None if shallow or out.probs is not None else self._head_vocab(running)
        active = [i for i, c in enumerate(caps) if c > 0]
        if (feature and self.draft_loop == "native" and active and out.probs is None
                and all(running[i].params.temperature <= 0 for i in active)
                and self._draft_native(running, active, caps, policy, out)):
            return out
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
            logits = logits[:, 0]  # [n, V]
            for i, s in zip(active, seqs):
                # (a feature draft's position t reads token t + 1: it holds one position fewer than the tokens)
                s.cached[key] = len(s.tokens) + len(drafts[i]) - feature
                s.metrics.small_steps += 1
            offsets = [s.iteration * _DRAFT_STRIDE + step for s in seqs]
            if fixed is None or fixed[0] != active:
                sp = self._sampling(seqs, offsets)
                fixed = (active, sp)
            else:  # the same rows as the last step: only the offsets move
                sp = {**fixed[1], "offset": to_device(offsets, torch.int64, self.device)}
            res = ops.sample_draft(logits, fallback_threshold=0.0 if energy else fallback_threshold, **sp)
            # E-LANG: a high energy -T logsumexp(z/T) marks a hard token; BiLD: a low max probability.
            unsure = (res.energies > fallback_threshold) if energy else res.fallback
            row_probs = ops.filtered_probs(logits, sp["temperature"], sp["top_k"], sp["top_p"]) if out.probs else None
            confs = res.max_probs.tolist() if out.confidences is not None else None
            still = []
            for j, (i, tok, fb) in enumerate(zip(active, _token_ids(res, vocab).tolist(), unsure.tolist())):
                if fb:  # the drafter is unsure: its token is discarded and the large model takes over
                    running[i].metrics.fallbacks += 1
                    if confs is not None:
                        out.unsure[i] = (tok, confs[j])
                    continue
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
                              policy.fallback_signal == "energy")
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
            caps = [c if s.cached["large"] > 0 else 0 for s, c in zip(running, caps)]
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
                               self._sampling_values(seqs, [s.iteration * _DRAFT_STRIDE for s in seqs]),
                               policy.thresholds()[0], policy.fallback_signal == "energy", with_probs=with_probs,
                               features=features)
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
        return out

    def _keeps_features(self, policy: Policy) -> bool:
        return self.small_kind == "feature" and policy.drafts and policy.drafter == "small"

    def _target_logits(self, running: list[Sequence], policy: Policy, drafts: list[list[int]]) -> torch.Tensor:
        """One pass of the large model over every row's uncached tokens + draft: [B, K+1, V]."""
        rows = [s.row for s in running]
        if policy.drafter != "shallow":
            toks = [s.tokens[s.cached["large"]:] + d for s, d in zip(running, drafts)]
            if self._keeps_features(policy):  # a feature draft reads the verified positions' hidden states
                target_logits, hidden = self.runners["large"].extend(rows, toks, [len(d) + 1 for d in drafts],
                                                                     return_hidden=True)
                for s, h in zip(running, hidden):
                    s.pass_features = (s.cached["large"], h)
            else:
                target_logits = self.runners["large"].extend(rows, toks, [len(d) + 1 for d in drafts])
        else:
            groups = self._layer_groups(policy)
            # The shallow group first catches up on what it has not seen (a prompt, a capped run's last draft)...
            behind = [i for i, (s, d) in enumerate(zip(running, drafts)) if s.cached["large"] < len(s.tokens) + len(d)]
            if behind:
                toks = [(running[i].tokens + drafts[i])[running[i].cached["large"]:] for i in behind]
                _, hidden = groups.shallow([rows[i] for i in behind], toks, [0] * len(behind))
                for i, h in zip(behind, hidden):
                    running[i].hidden.append(h)
            # ...then the deep layers run once over every token whose deep KV is pending.
            target_logits = groups.deep(rows, [s.hidden for s in running], [s.cached["deep"] for s in running],
                                        [len(d) + 1 for d in drafts])
            for s, d in zip(running, drafts):
                s.cached["deep"] = len(s.tokens) + len(d)
                s.hidden = []
        for s, d in zip(running, drafts):
            s.cached["large"] = len(s.tokens) + len(d)
            s.metrics.large_passes += 1
        return target_logits

    def _verify(self, running: list[Sequence], policy: Policy, drafts: Drafts) -> list[list[int]]:
        draft_tokens = drafts.tokens
        K = max(len(d) for d in draft_tokens)
        target_logits = self._target_logits(running, policy, draft_tokens)  # [B, K+1, V]
        draft_ids = torch.tensor([d + [-1] * (K - len(d)) for d in draft_tokens], dtype=torch.int64)
        draft_ids = draft_ids.view(len(running), K)  # (K = 0: [n, 0], not the [n] a list of empty lists gives)
        kw = self._sampling(running, [s.iteration for s in running])
        mode, looked = policy.verify_mode, drafts.looked_up or [False] * len(running)
        if policy.drafter == "lookup" and not kw["sampled"]:
            mode = "greedy"  # one-hot drafts of greedy rows: speculative sampling accepts exactly the argmax's
        if mode == "bild":
            kw["rollback_threshold"] = policy.thresholds()[1]
        if mode == "sample":
            kw["draft_probs"] = self._draft_probs(drafts, looked, K, target_logits)
        res = ops.verify_draft(draft_ids.to(self.device, non_blocking=True), target_logits, mode, **kw)
        # One host read (each .tolist() of a GPU tensor is a synchronisation) for the verdicts and the step's fault
        # flags of every model (noted while its passes ran, all before this point of the step): `step_faults`, for
        # the scheduler, which would otherwise read them again.
        names = list(self.runners)
        runners = [self.runners[n] for n in names]
        flags = nonfinite_flags(runners)
        B, K1 = res.output_ids.shape
        host = torch.cat([res.num_accepted.to(torch.int64), res.output_ids.flatten(),
                          flags.flatten().to(torch.int64)]).tolist()
        num_accepted, out = host[:B], host[B:B + B * K1]
        out_ids = [out[i * K1:(i + 1) * K1] for i in range(B)]
        self.step_faults = dict(zip(names, forget_nonfinite(runners, host[B + B * K1:])))
        # The large model's argmax at every position: Jacobi's next guesses, calibration's labels.
        argmax = None
        if policy.drafter == "guess" or policy.calibration is not None:
            B, K1, V = target_logits.shape
            argmax = ops.sample_draft(target_logits.reshape(B * K1, V)).token_ids.view(B, K1).tolist()
        if policy.calibration is not None:  # (the small model's drafts only: a lookup's tokens carry no confidence)
            model_drafts = [[] if x else d for d, x in zip(draft_tokens, looked)]
            policy.calibration.observe(*labelled_pairs(model_drafts, drafts.confidences, drafts.unsure, argmax,
                                                       res.distances.tolist()))
        committed, rollbacks = [], {name: ([], []) for name in self.runners}
        for i, (s, d, a, out) in enumerate(zip(running, draft_tokens, num_accepted, out_ids)):
            new = out[:a + 1]
            if d:
                m = s.metrics
                m.drafted_tokens += len(d)
                m.accepted_tokens += a
                m.accepted_lengths[a] += 1
                m.rollbacks += a < len(d)
                if looked[i]:
                    m.lookup_drafted_tokens += len(d)
                    m.lookup_accepted_tokens += a
            if policy.drafter == "guess":  # Jacobi: predictions past the emitted token become the next guesses
                s.guesses = argmax[i][a + 1:len(d) + 1]
            valid = len(s.tokens) + a  # cached tokens still on the committed path
            if s.pass_features is not None:
                start, h = s.pass_features
                s.features.append(h[:valid - start])
                s.pass_features = None
            s.tokens += new
            s.iteration += 1
            s.cached["deep"] = min(s.cached["deep"], valid)
            for name in self.runners:
                if s.cached[name] > valid:
                    rollbacks[name][0].append(s.row)
                    rollbacks[name][1].append(s.cached[name] - valid)
                    s.cached[name] = valid
            committed.append(new)
        for name, (rows, counts) in rollbacks.items():
            if rows:
                self.runners[name].rollback(rows, counts)
        return committed

    def _draft_probs(self, drafts: Drafts, looked: list[bool], K: int, target_logits: torch.Tensor) -> torch.Tensor:
        """Speculative sampling's draft distributions [B, K, V]: the small model's, and one-hot ones for the rows
        whose drafts the lookup chose (a deterministic draft: accepted with probability q(token))."""
        rows = [[] if x or drafts.probs is None else p for p, x in zip(drafts.probs or [None] * len(looked), looked)]
        return ops.pack_draft_probs(rows, K, self.vocab_size, target_logits,
                                    one_hot=[d if x else None for d, x in zip(drafts.tokens, looked)])


def _pending_features(s: Sequence) -> int:
    """The verified positions whose large-model features a feature draft has not been fed yet (every one from
    s.cached["small"] to the last token's)."""
    have = sum(f.shape[0] for f in s.features)
    if s.cached["small"] + have != len(s.tokens) - 1:  # an engine bug, not a user error
        raise RuntimeError(f"feature draft out of step: {s.cached['small']} fed + {have} pending features "
                           f"for {len(s.tokens)} tokens")
    return have


def _token_ids(res, vocab: torch.Tensor | None) -> torch.Tensor:
    """The sampled token ids of `res` (an `ops.sample_draft` result), mapped through a reduced head's
    vocabulary when the logits were over it (see `Iteration._head_vocab`)."""
    return res.token_ids if vocab is None else vocab[res.token_ids]
