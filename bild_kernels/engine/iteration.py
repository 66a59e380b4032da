"""One iteration of the engine over its running batch: draft (`drafting.py`), verify, commit.

`Iteration` is the half of `Engine` that steps: it holds no state of its own (the runners, the
sequences and the time split are the engine's) and is split out only to keep each file readable.
The loop is described at the top of `bild_kernels/engine/engine.py`.
"""
from __future__ import annotations

import os
import time

import torch

from bild_kernels import ops
from bild_kernels.engine.calibration import labelled_pairs
from bild_kernels.engine.drafting import Drafting, drafted_ids
from bild_kernels.engine.host import to_device
from bild_kernels.engine.logprobs import note_logprobs, note_prompt_logprobs
from bild_kernels.engine.guiding import guided
from bild_kernels.engine.penalizing import penalized
from bild_kernels.engine.processing import processed
from bild_kernels.engine.policies import Policy
from bild_kernels.engine.prefill_chunks import PrefillChunks
from bild_kernels.engine.runner import forget_nonfinite, nonfinite_flags
from bild_kernels.engine.sequence import Drafts, Sequence


class Iteration(PrefillChunks, Drafting):
    """Engine methods that run one step over the running batch (mixed into `Engine`): `Drafting` proposes, these
    verify and commit; `PrefillChunks` splits long prompts' prefills over steps."""

    @staticmethod
    def _sampling_values(seqs: list[Sequence], offsets: list[int]) -> dict:
        """The rows' sampling parameters as host lists (what the static draft loop copies over in one go)."""
        return dict(temperature=[s.params.temperature for s in seqs], top_k=[s.params.top_k for s in seqs],
                    top_p=[s.params.top_p for s in seqs], seed=[s.params.seed for s in seqs], offset=offsets,
                    min_p=[s.params.min_p for s in seqs])

    def _sampling(self, seqs: list[Sequence], offsets: list[int]) -> dict:
        """The same on the device: two host-to-device copies (the float and the integer fields), not five; with
        what the host knows of the rows (the ops' `sampled` / `filtered`: kernels for neither kind are skipped)."""
        v, dev = self._sampling_values(seqs, offsets), self.device
        floats = to_device([v["temperature"], v["top_p"], v["min_p"]], torch.float32, dev)
        ints = to_device([v["top_k"], v["seed"], v["offset"]], torch.int64, dev)
        sampled, filtered = ops.known_row_kinds(v["temperature"], v["top_k"], v["top_p"], v["min_p"])
        return dict(temperature=floats[0], top_k=ints[0].to(torch.int32), top_p=floats[1], seed=ints[1],
                    offset=ints[2], min_p=floats[2], sampled=sampled, filtered=filtered)

    def _step(self, running: list[Sequence], policy: Policy) -> list[list[int]]:
        """One iteration over the running batch; returns the tokens committed per sequence (none for a row whose
        long prompt is still going through in chunks: `prefill_chunks`)."""
        waiting = {id(s) for s in running if self._prefilling(s, policy)}
        if not waiting:
            return self._step_batch(running, policy)
        self._prefill_chunk(next(s for s in running if id(s) in waiting), policy)  # the first in admission order
        rest = [s for s in running if id(s) not in waiting]
        done = dict(zip(map(id, rest), self._step_batch(rest, policy))) if rest else {}
        return [done.get(id(s), []) for s in running]

    def _step_batch(self, running: list[Sequence], policy: Policy) -> list[list[int]]:
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
            s.resumed = False
        res = ops.sample_draft(logits[:, 0], **self._sampling(running, [s.iteration for s in running]))
        new = [[t] for t in drafted_ids(res, vocab).tolist()]
        ask = [i for i, s in enumerate(running) if s.logprobs is not None]
        if ask:  # (the small model decided these tokens: its log-probabilities)
            note_logprobs([running[i] for i in ask], logits[ask, :1], res.token_ids[ask].view(-1, 1), [1] * len(ask),
                          vocab)
        for s, t in zip(running, new):
            s.tokens += t
            s.iteration += 1
        return new

    def _keeps_features(self, policy: Policy) -> bool:
        return self.small_kind == "feature" and policy.drafts and policy.drafter == "small"

    def _target_logits(self, running: list[Sequence], policy: Policy, drafts: list[list[int]]) -> torch.Tensor:
        """One pass of the large model over every row's uncached tokens + draft: [B, K+1, V]."""
        rows = [s.row for s in running]
        if policy.drafter != "shallow":
            toks = [s.tokens[s.cached["large"]:] + d for s, d in zip(running, drafts)]
            keeps = self._keeps_features(policy)  # a feature draft reads the verified positions' hidden states
            # (and the prefix cache keeps a prompt's, for the feature draft of a later request that shares it)
            first = self._keeps_prompt_features(policy) and any(s.metrics.large_passes == 0 for s in running)
            n_logits = [len(d) + 1 for d in drafts]
            scored = [s.params.prompt_logprobs is not None and s.metrics.large_passes == 0 for s in running]
            if any(scored):  # these rows' prefill takes every prompt position's logits (SamplingParams.prompt_logprobs)
                n_logits = [len(t) if x else n for t, n, x in zip(toks, n_logits, scored)]
            if keeps or first:
                target_logits, hidden = self.runners["large"].extend(rows, toks, n_logits, return_hidden=True)
                for s, h in zip(running, hidden):
                    if keeps:
                        s.pass_features = (s.cached["large"], h)
                    if first and s.metrics.large_passes == 0:
                        s.prompt_features = (s.prompt_features or []) + [h[:s.prompt_len - s.cached["large"]]]
            else:
                target_logits = self.runners["large"].extend(rows, toks, n_logits)
            if any(scored):
                target_logits = self._score_prompts(running, drafts, toks, n_logits, scored, target_logits)
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
            s.resumed = False
        return target_logits

    def _score_prompts(self, running, drafts, toks, n_logits, scored, logits: torch.Tensor) -> torch.Tensor:
        """Note the prompt log-probabilities of the `scored` rows, whose logits cover every token of their pass
        (the whole prompt, or what its chunks left of it: no prefix was restored for them), and return the
        verification's [B, K+1, V]: each row's logits of its last len(draft) + 1 tokens, padded by repeating the last
        (as `extend` pads)."""
        K1 = max(len(d) for d in drafts) + 1
        for i, s in enumerate(running):
            if scored[i]:  # (after a chunked prefill's chunks: the rest of the prompt)
                note_prompt_logprobs(s, logits[i], s.cached["large"])
        index = []
        for i, (t, n, d) in enumerate(zip(toks, n_logits, drafts)):
            first = n - (len(d) + 1)  # (n = len(t) for a scored row, else len(d) + 1: first = 0)
            index.append([first + min(j, len(d)) for j in range(K1)])
        rows = torch.arange(len(running), device=logits.device)[:, None]
        return logits[rows, torch.tensor(index, device=logits.device)]

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
        # The distribution the drafts are verified against: with penalties (SamplingParams), the penalised logits;
        # the raw ones stay for logprobs.
        raw_logits, target_logits = target_logits, penalized(target_logits, running, self.eos_ids, draft_ids)
        target_logits = guided(target_logits, running, draft_tokens)  # (structured outputs: the pattern's masks)
        target_logits = processed(target_logits, running, draft_tokens)  # (SamplingParams.logits_processors)
        # (the large model's head took its logits' statistics: verify_draft reads only the drafted tokens' logits;
        # on the CPU backend, with the engine's own inputs unchecked, unless a backend is forced)
        stats = self.runners["large"].logit_stats(raw_logits) if target_logits is raw_logits else None
        if stats is not None and mode != "sample" and not os.environ.get("BILD_BACKEND"):
            res = ops.verify_draft_cpu_trusted(draft_ids, target_logits, mode, kw.get("rollback_threshold"),
                                               kw["temperature"], kw["top_k"], kw["top_p"], kw["seed"], kw["offset"],
                                               stats, kw["min_p"])
        else:
            res = ops.verify_draft(draft_ids.to(self.device, non_blocking=True), target_logits, mode,
                                   target_stats=stats, **kw)
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
        ask = [i for i, s in enumerate(running) if s.logprobs is not None]
        if ask:  # the large model's log-probabilities of the tokens each row commits (a second host read)
            every = len(ask) == len(running)  # (then no copy of the rows that ask)
            note_logprobs([running[i] for i in ask], raw_logits if every else raw_logits[ask],
                          res.output_ids if every else res.output_ids[ask], [num_accepted[i] + 1 for i in ask])
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
            if s.guide is not None:
                s.guide.advance(new)
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
        # (a looked-up row's list is empty: the small model skipped it; NGram has none at all)
        rows = drafts.probs if drafts.probs is not None else [[] for _ in looked]
        return ops.pack_draft_probs(rows, K, self.vocab_size, target_logits,
                                    one_hot=[d if x else None for d, x in zip(drafts.tokens, looked)])
