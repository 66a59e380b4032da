"""The `bild` command on tiny models saved to disk: generate, eval, bench, distill, and bad input."""
import csv
import json

import pytest
import torch

from bild_kernels import cli

from .engine.conftest import shallow_copy, tiny_llama, word_tokenizer


def _tokenizer():
    return word_tokenizer([f"w{i}" for i in range(96)])


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    large = tiny_llama(1, layers=3, dtype=torch.float32)
    with torch.no_grad():  # a weak last layer: the 2-layer copy then agrees often (see engine/conftest.py)
        large.model.layers[2].self_attn.o_proj.weight.mul_(0.3)
        large.model.layers[2].mlp.down_proj.weight.mul_(0.3)
    small = shallow_copy(large, layers=2, noise=0.3).to(torch.float32)
    tok = _tokenizer()
    for name, model in (("large", large), ("small", small)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "large", root / "small"


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_text_and_reports_the_run(capsys, pair_dirs):
    large, small = pair_dirs
    code, out, err = _run(capsys, "generate", "w1 w2 w3", "--large", large, "--small", small, "--max-tokens", 12,
                          "--no-chat-template", "--policy", "bild", "--fallback-threshold", 0.3)
    assert code == 0, err
    assert len(out.split()) == 12 and all(w.startswith("w") or w == "<unk>" for w in out.split())
    last = err.strip().splitlines()[-1]
    for word in ("tokens/s", "acceptance", "fallbacks", "rollbacks", "bild(", "first after"):
        assert word in last


def test_generate_samples_with_a_random_seed_unless_given_one_and_says_which(capsys, pair_dirs, monkeypatch):
    from bild_kernels.cli import generate
    large, small = pair_dirs
    drawn = iter([5, 6])
    monkeypatch.setattr(generate.secrets, "randbelow", lambda n: next(drawn))
    runs = []
    for extra in ([], [], ["--seed", 5], ["--temperature", 0]):
        temp = [] if extra[:1] == ["--temperature"] else ["--temperature", 1.0]
        code, out, err = _run(capsys, "generate", "w1 w2 w3", "--large", large, "--small", small, "--max-tokens", 12,
                              "--no-chat-template", "--policy", "sampling", *temp, *extra)
        assert code == 0, err
        runs.append((out.split(), err.strip().splitlines()[-1]))
    assert [" | seed 5" in runs[0][1], " | seed 6" in runs[1][1], " | seed 5" in runs[2][1]] == [True] * 3
    assert runs[0][0] == runs[2][0] and runs[0][0] != runs[1][0]  # the seed shown reproduces the run
    assert " | seed" not in runs[3][1]  # greedy: no seed to speak of


def test_generate_passes_penalties_on(capsys, pair_dirs):
    large, small = pair_dirs
    outs = []
    for extra in ([], ["--frequency-penalty", -2, "--presence-penalty", -2, "--min-tokens", 3, "--logit-bias", "25=-100",
                       "--logit-bias", "7=3"]):
        code, out, err = _run(capsys, "generate", "w1 w2 w3", "--large", large, "--small", small, "--max-tokens", 12,
                              "--no-chat-template", "--policy", "greedy", *extra)
        assert code == 0, err
        outs.append(out.split())
    assert outs[1] and outs[0] != outs[1]


def test_generate_min_p_one_is_greedy(capsys, pair_dirs):
    """--min-p 1 keeps only the most likely token: sampling at temperature 1 writes the greedy reply."""
    large, small = pair_dirs
    outs = []
    for extra in (["--temperature", 0], ["--temperature", 1.0, "--seed", 3, "--min-p", 1.0],
                  ["--temperature", 1.0, "--seed", 3]):
        code, out, err = _run(capsys, "generate", "w1 w2 w3", "--large", large, "--small", small, "--max-tokens", 12,
                              "--no-chat-template", "--policy", "sampling", *extra)
        assert code == 0, err
        outs.append(out.split())
    assert outs[0] == outs[1] != outs[2]


def test_generate_chunks_a_long_prompt_with_the_same_text(capsys, pair_dirs):
    large, small = pair_dirs
    prompt = " ".join(f"w{i % 30}" for i in range(40))
    outs = []
    for chunk in (0, 8):
        code, out, err = _run(capsys, "generate", prompt, "--large", large, "--small", small, "--max-tokens", 6,
                              "--no-chat-template", "--policy", "greedy", "--prefill-chunk", chunk)
        assert code == 0, err
        outs.append(out.split())
    assert outs[0] == outs[1] and outs[0]


def test_generate_puts_a_system_message_before_the_prompt(capsys, tmp_path, pair_dirs):
    import shutil

    from bild_kernels import Engine, SamplingParams
    large, _ = pair_dirs
    chat = tmp_path / "chat"
    shutil.copytree(large, chat)
    tok = word_tokenizer([f"w{i}" for i in range(90)] + ["turn", "system", "user", "assistant", "endturn"])
    tok.chat_template = ("{% for m in messages %}turn {{ m['role'] }} {{ m['content'] }} endturn {% endfor %}"
                         "{% if add_generation_prompt %}turn assistant{% endif %}")
    tok.save_pretrained(chat)
    code, out, err = _run(capsys, "generate", "w1 w2", "--system", "w5 w6", "--large", chat, "--max-tokens", 8,
                          "--policy", "large-only")
    assert code == 0, err
    eng = Engine(large=str(chat), max_batch_size=1, max_model_len=64)
    want = eng.generate([[{"role": "system", "content": "w5 w6"}, {"role": "user", "content": "w1 w2"}]],
                        SamplingParams(max_tokens=8))[0]
    plain = eng.generate(["w1 w2"], SamplingParams(max_tokens=8), chat_template=True)[0]
    assert want.prompt_token_ids[:5] == tok("turn system w5 w6 endturn")["input_ids"]
    assert out.strip() == want.text.strip() and want.prompt_token_ids != plain.prompt_token_ids


@pytest.mark.parametrize("policy", [["greedy"], ["jacobi", "--block-size", "3"], ["shallow-deep", "--exit-layer", "1"],
                                    ["bild", "--rollback-threshold", "0"], ["ngram", "--max-draft-len", "5"],
                                    ["greedy", "--lookup", "3", "--min-ngram", "1"]])
def test_lossless_policies_equal_large_only(capsys, pair_dirs, policy):
    large, small = pair_dirs
    texts = []
    for pol in (["large-only"], policy):
        code, out, err = _run(capsys, "generate", "w4 w8", "--large", large, "--small", small, "--max-tokens", 10,
                              "--no-chat-template", "--policy", *pol)
        assert code == 0, err
        texts.append(out)
    assert texts[0] == texts[1]


def test_generate_reports_the_lookups_drafts(capsys, pair_dirs):
    large, small = pair_dirs
    code, out, err = _run(capsys, "generate", "w5 w6 w7 w5 w6 w7 w5 w6", "--large", large, "--small", small,
                          "--max-tokens", 16, "--no-chat-template", "--policy", "ngram")
    assert code == 0, err
    assert "n-gram lookup:" in err.strip().splitlines()[-1] and "drafts kept" in err


@pytest.mark.parametrize("argv, match", [
    (["generate", "hi", "--large", "/no/such/model"], "no such file or directory"),
    (["generate", "   ", "--large", "{large}"], "prompt is empty"),
    (["generate", "hi", "--small", "{small}"], "--small needs --large"),
    (["generate", "hi", "--large", "{large}", "--policy", "greedy", "--fallback-threshold", "0.5"], "does not apply to"),
    (["generate", "hi", "--large", "{large}", "--small", "{small}", "--fallback-threshold", "1.5"],
     "fallback_threshold must be in"),
    (["generate", "hi", "--large", "{large}", "--max-tokens", "0"], "max_tokens must be a positive int"),
    (["generate", "hi", "--large", "{large}", "--repetition-penalty", "0"], "repetition_penalty must be"),
    (["generate", "hi", "--large", "{large}", "--min-p", "1.5"], "min_p must be"),
    (["generate", "hi", "--large", "{large}", "--min-tokens", "200", "--max-tokens", "8"], "min_tokens must be"),
    (["generate", "hi", "--large", "{large}", "--logit-bias", "x=2"], "--logit-bias takes TOKEN_ID=BIAS"),
    (["generate", "hi", "--large", "{large}", "--logit-bias", "3=500"], "logit_bias values must be"),
    (["generate", "hi", "--large", "{bad_gguf}"], "cannot load GGUF"),
    (["generate", "hi", "--large", "{large}", "--small", "{other_tok}"], "tokenizer differs"),
    (["eval", "--large", "{large}"], "needs a small model"),
    (["eval", "--large", "{large}", "--small", "{feature}", "--hf"], "is a feature draft"),
    (["generate", "hi", "--large", "{large}", "--small", "{small}", "--fallback-signal", "energy"],
     "needs --fallback-threshold"),
    (["generate", "hi", "--large", "{large}", "--policy", "shallow-deep"], "needs --exit-layer"),
    (["generate", "hi", "--large", "{large}", "--policy", "jacobi", "--block-size", "0"], "block_size must be"),
    (["generate", "hi", "--large", "{large}", "--draft-max-batch", "0"], "draft-max-batch must be a positive int"),
    (["generate", "hi", "--large", "{large}", "--prefix-cache", "-4"], "--prefix-cache must be a number of tokens"),
    (["generate", "hi", "--large", "{large}", "--prefix-cache", "lots"], "--prefix-cache must be a number of tokens"),
    (["generate", "hi", "--large", "{large}", "--prefill-chunk", "-1"], "--prefill-chunk must be a number of tokens"),
    (["generate", "hi", "--large", "{large}", "--prefill-chunk", "big"], "--prefill-chunk must be a number of tokens"),
    (["generate", "hi", "--large", "{large}", "--system", "be brief"], "--system needs the model's chat template"),
    (["generate", "hi", "--large", "{large}", "--policy", "greedy", "--max-ngram", "2"], "without --lookup"),
    (["generate", "hi", "--large", "{large}", "--policy", "ngram", "--lookup", "2"], "--lookup does not apply"),
    (["generate", "hi", "--large", "{large}", "--policy", "greedy", "--lookup", "-2"], "--lookup must be an int in"),
    (["generate", "hi", "--large", "{large}", "--policy", "ngram", "--min-ngram", "4"], "--min-ngram must be <="),
    (["generate", "hi", "--large", "{large}", "--policy", "ngram", "--max-ngram", "1", "--min-ngram", "2"],
     "--min-ngram must be <="),
    (["eval", "--large", "{large}", "--small", "{small}", "--lookup", "-1"], "--lookup must be an int in"),
    (["eval", "--large", "{large}", "--small", "{small}", "--prompt-set", "tune", "--prompts", "60"],
     "--prompts must be in [1, 59]"),
    (["distill", "--large", "{large}", "--out", "{tmp}/d", "--work-dir", "{tmp}/w", "--prompts", "30000"],
     "prompts must be in [1, 23704]"),
    (["generate", "hi", "--large", "{large}", "--regex", "(?=a)b"], "lookarounds"),
    (["generate", "hi", "--large", "{large}", "--json-schema", "{tmp}/none.json"], "--json-schema: cannot read"),
    (["generate", "hi", "--large", "{large}", "--json-schema", '{{"type": "number", "minimum": 1}}'], "'minimum'"),
    (["generate", "hi", "--large", "{large}", "--choice", " w7"], "end-of-sequence"),  # (the tiny model has no EOS)
])
def test_bad_input_is_one_line_on_stderr(capsys, tmp_path, pair_dirs, argv, match):
    large, small = pair_dirs
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    other = tmp_path / "other"
    if "{other_tok}" in argv:
        model = shallow_copy(tiny_llama(1, layers=3, dtype=torch.float32), layers=1, noise=0.0).to(torch.float32)
        model.save_pretrained(other)
        tok = _tokenizer()
        tok.add_tokens(["extra"])
        tok.save_pretrained(other)
    feature = tmp_path / "feature"  # a feature draft's manifest: --hf refuses it before any model loads
    feature.mkdir()
    (feature / "bild_draft.json").write_text(json.dumps({"format": "bild-draft/1", "kind": "feature"}))
    argv = [a.format(large=large, small=small, bad_gguf=bad, other_tok=other, tmp=tmp_path, feature=feature)
            for a in argv]
    code, out, err = _run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("bild: error:") and match in lines[-1], err
    assert "Traceback" not in err
    assert not (tmp_path / "w").exists()  # distill refused before it made its work dir or loaded a model


def test_eval_writes_table_csv_and_plot(capsys, tmp_path, pair_dirs):
    large, small = pair_dirs
    csv_path, png = tmp_path / "eval.csv", tmp_path / "tradeoff.png"
    code, out, err = _run(capsys, "eval", "--large", large, "--small", small, "--prompts", 3, "--max-tokens", 6,
                          "--sweep", "--fallback-grid", "0.2,0.6", "--rollback-grid", "0.5", "--out", csv_path,
                          "--plot", png, "--energy-grid", "-3", "--auto", "--jacobi", 3, "--shallow-deep", 1)
    assert code == 0, err
    rows = list(csv.DictReader(open(csv_path)))
    names = [r["policy"] for r in rows]
    assert names[0] == "large-only" and any(n.startswith("greedy") for n in names) and len(rows) == 9
    assert any("fallback_signal=energy" in n for n in names) and any("=auto" in n for n in names)
    for name in ("jacobi", "shallow-deep"):  # lossless without a draft model
        row = next(r for r in rows if r["policy"].startswith(name))
        assert float(row["exact_match"]) == 1.0 and 0 < float(row["passes_per_token"]) <= 1.0
    greedy = next(r for r in rows if r["policy"].startswith("greedy"))
    assert float(greedy["exact_match"]) == 1.0 and float(greedy["rouge_l"]) == 1.0  # lossless
    assert float(rows[0]["nll_ratio"]) == 1.0 and float(rows[0]["speedup"]) == 1.0
    assert "| policy" in out and "decode_speedup" in out and png.stat().st_size > 1000
    assert float(rows[0]["decode_speedup"]) == 1.0 and float(rows[0]["ttft_ms"]) > 0
    assert rows[0]["large_weights"] == "float32"  # a directory's float32 weights (a GGUF's: "q4_1" where it holds them)
    assert rows[0]["draft_loop"] == "native"  # the CPU default (--draft-loop)
    assert rows[0]["prompt_set"] == "held-out"


def test_eval_tune_prompt_set_runs_the_tuning_prompts(capsys, tmp_path, pair_dirs, monkeypatch):
    from bild_kernels import evaluate
    from bild_kernels.distill.corpus import chat_ids
    from bild_kernels.distill.prompts import held_out_prompts, tune_prompts
    large, small = pair_dirs
    seen = []
    real = evaluate.evaluate
    monkeypatch.setattr(evaluate, "evaluate", lambda engine, prompts, *a, **k: (
        seen.append((engine, prompts)), real(engine, prompts, *a, **k))[1])
    csv_path = tmp_path / "eval.csv"
    code, out, err = _run(capsys, "eval", "--large", large, "--small", small, "--prompts", 2, "--max-tokens", 4,
                          "--prompt-set", "tune", "--out", csv_path)
    assert code == 0, err
    engine, prompts = seen[0]
    assert prompts == [chat_ids(engine.tokenizer, p) for p in tune_prompts()[:2]]
    assert prompts != [chat_ids(engine.tokenizer, p) for p in held_out_prompts()[:2]]
    assert {r["prompt_set"] for r in csv.DictReader(open(csv_path))} == {"tune"}


def test_eval_prefix_cache_reuses_what_prompts_share(capsys, tmp_path, pair_dirs):
    large, small = pair_dirs
    csv_path = tmp_path / "eval.csv"
    code, out, err = _run(capsys, "eval", "--large", large, "--small", small, "--prompts", 3, "--max-tokens", 4,
                          "--prefix-cache", 4096, "--out", csv_path)
    assert code == 0, err
    rows = list(csv.DictReader(open(csv_path)))
    assert {r["prefix_cache"] for r in rows} == {"4096"} and "cached_prompt" in out
    # the tiny tokenizer reads the held-out prompts as runs of <unk>: the third begins with the first two (which are
    # the same tokens, so neither reuses the other, as no prompt reuses its own run); every policy alike
    cached = {float(r["cached_prompt"]) for r in rows}
    assert len(cached) == 1 and cached.pop() == pytest.approx(7 / 3, abs=1e-3)
    assert float(next(r for r in rows if r["policy"].startswith("greedy"))["exact_match"]) == 1.0


def test_eval_lookup_adds_ngram_rows(capsys, tmp_path, pair_dirs):
    large, small = pair_dirs
    csv_path = tmp_path / "eval.csv"
    code, out, err = _run(capsys, "eval", "--large", large, "--small", small, "--prompts", 3, "--max-tokens", 12,
                          "--lookup", 4, "--out", csv_path, "--hf")
    assert code == 0, err
    rows = {r["policy"]: r for r in csv.DictReader(open(csv_path))}
    names = list(rows)
    assert "ngram(max_draft_len=4)" in names
    assert any(n.startswith("greedy(") and "lookup=ngram(max_draft_len=4)" in n for n in names)
    assert any(n.startswith("bild(") and "lookup=" in n for n in names)
    assert "hf prompt lookup (4)" in names and len(rows) == 10  # and HF generate, assisted twice
    code, out, err = _run(capsys, "eval", "--large", large, "--small", small, "--prompts", 2, "--max-tokens", 6,
                          "--lookup", 3, "--sweep", "--fallback-grid", "0.3", "--rollback-grid", "1,2", "--out",
                          tmp_path / "sweep.csv", "--plot", tmp_path / "sweep.png")
    assert code == 0, err
    swept = [r["policy"] for r in csv.DictReader(open(tmp_path / "sweep.csv")) if "fallback_threshold=0.3" in r["policy"]]
    assert len(swept) == 4 and sum("lookup=" in n for n in swept) == 2  # each point with and without the lookup
    for name, row in rows.items():  # the greedy ones are lossless (HF's rows against HF generate's text)
        if name.startswith(("ngram", "greedy", "hf prompt lookup")):
            assert float(row["exact_match"]) == 1.0, name


def test_distill_writes_a_draft_the_engine_loads(tmp_path, pair_dirs):
    from bild_kernels import Engine, Greedy, SamplingParams
    from bild_kernels.distill.pipeline import distill
    large, _ = pair_dirs
    out = tmp_path / "draft"
    stats = distill(large=large, out=out, prompts=6, max_new_tokens=6, minutes=0.02, init_layers=[0, 2],
                    draft_vocab=50, work_dir=tmp_path / "work", log=lambda s: None)
    manifest = json.loads((out / "bild_draft.json").read_text())
    assert manifest["init_layers"] == [0, 2] and manifest["draft_vocab_size"] == stats["draft_vocab"]
    assert f"**{stats['agreement']:.3f}**" in (out / "README.md").read_text()
    assert ("bfloat16" in (out / "README.md").read_text()) == stats["bf16"]
    eng = Engine(large=str(large), small=str(out), max_batch_size=1, max_model_len=64)
    o = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=8), policy=Greedy())[0]
    ref = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=8), policy=cli_large_only())[0]
    assert o.token_ids == ref.token_ids and o.metrics.drafted_tokens > 0
    assert (tmp_path / "work" / "corpus_eval.pt").is_file()  # cached for the next run


def test_distill_feature_writes_a_feature_draft_the_engine_runs(tmp_path, pair_dirs):
    from bild_kernels import Engine, Greedy, LargeOnly, SamplingParams
    from bild_kernels.distill.pipeline import distill
    large, _ = pair_dirs
    out = tmp_path / "fdraft"
    stats = distill(large=large, out=out, prompts=6, max_new_tokens=6, minutes=0.02, draft_vocab=50, kind="feature",
                    work_dir=tmp_path / "work", bf16=False, log=lambda s: None)
    manifest = json.loads((out / "bild_draft.json").read_text())
    assert manifest["kind"] == "feature" and manifest["init_layers"] == [2] and stats["kind"] == "feature"
    card = (out / "README.md").read_text()
    assert card.startswith("# Feature draft") and f"**{stats['agreement']:.3f}**" in card
    eng = Engine(large=str(large), small=str(out), max_batch_size=1, max_model_len=64)
    o = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=8), policy=Greedy())[0]
    assert o.token_ids == eng.generate([[1, 2, 3]], SamplingParams(max_tokens=8), policy=LargeOnly())[0].token_ids
    assert o.metrics.drafted_tokens > 0
    with pytest.raises(ValueError, match="init_layers"):
        distill(large=large, out=out, kind="feature", init_layers=[0], log=lambda s: None)
    with pytest.raises(ValueError, match="kind must be"):
        distill(large=large, out=out, kind="eagle", log=lambda s: None)


def cli_large_only():
    from bild_kernels import LargeOnly
    return LargeOnly()


def test_rouge_l():
    from bild_kernels.evaluate import rouge_l
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([1, 2, 3], [4, 5]) == 0.0
    assert rouge_l([1, 9, 2, 3], [1, 2, 3, 7]) == pytest.approx(0.75)  # LCS 3 of 4 and 4


def test_evaluate_interleaves_the_policies_and_measures_the_same_runs(pair_dirs, monkeypatch):
    """Every policy runs on each prompt in turn, in an order that rotates; the rows (tokens, quality,
    acceptance) are those of running each policy over all prompts in one go."""
    from bild_kernels import BiLD, Engine, Greedy
    from bild_kernels import evaluate as ev
    large, small = pair_dirs
    eng = Engine(large=str(large), small=str(small), device="cpu", max_batch_size=2, max_model_len=64)
    prompts, policies = [[3, 4, 5], [7, 8], [9, 10, 11, 12]], [Greedy(max_draft_len=2), BiLD(0.3, 1.0, 3)]
    order, real = [], ev.run_policy

    def spy(engine, chunk, params, policy, batch):
        order.append(ev.describe(policy).split("(")[0])
        return real(engine, chunk, params, policy, batch)
    monkeypatch.setattr(ev, "run_policy", spy)
    ticks = []
    rows = ev.evaluate(eng, prompts, policies, max_tokens=6, progress=lambda: ticks.append(1))
    assert order == ["large-only", "greedy", "bild", "greedy", "bild", "large-only", "bild", "large-only", "greedy"]
    assert len(ticks) == ev.eval_runs(len(prompts), len(policies)) == 9
    order.clear()
    seq = ev.evaluate(eng, prompts, policies, max_tokens=6, interleave=False)
    assert order == ["large-only", "greedy", "bild"]
    keys = ("policy", "tokens", "exact_match", "rouge_l", "nll", "acceptance", "large_passes", "rollbacks")
    assert [[r.as_dict()[k] for k in keys] for r in rows] == [[r.as_dict()[k] for k in keys] for r in seq]
    assert rows[1].exact_match == 1.0 and rows[0].speedup == 1.0
    # the prefill (time to first token) and the decode phase apart: the decode speed-up is that of the decode phase
    assert rows[0].decode_speedup == 1.0 and all(r.ttft_ms > 0 and r.decode_tokens_per_s > 0 for r in rows)
    assert rows[1].decode_speedup == pytest.approx(rows[1].decode_tokens_per_s / rows[0].decode_tokens_per_s)
    batched = ev.evaluate(eng, prompts, policies, max_tokens=6, batch=2)
    assert ev.eval_runs(3, 2, batch=2) == 6 and [r.tokens for r in batched] == [r.tokens for r in rows]


def test_eval_repeat_times_each_policy_by_its_fastest_run(monkeypatch, pair_dirs, capsys):
    """repeat=N: N interleaved rounds on each chunk, each in another rotation; a policy's row is timed by its
    fastest run on each chunk; a repeat that decodes other tokens is an error; --repeat below 1 is refused."""
    import dataclasses

    from bild_kernels import Engine, Greedy
    from bild_kernels import evaluate as ev
    large, small = pair_dirs
    eng = Engine(large=str(large), small=str(small), device="cpu", max_batch_size=1, max_model_len=64)
    prompts, policies = [[3, 4, 5], [7, 8]], [Greedy(max_draft_len=2)]
    order, real = [], ev.run_policy
    fake = iter([4.0, 3.0, 1.0, 2.0, 5.0, 6.0, 3.0, 7.0])  # the runs' wall times, in the order they run

    def spy(engine, chunk, params, policy, batch):
        order.append(ev.describe(policy).split("(")[0])
        outs, _, split = real(engine, chunk, params, policy, batch)
        return outs, next(fake), split
    monkeypatch.setattr(ev, "run_policy", spy)
    rows = ev.evaluate(eng, prompts, policies, max_tokens=6, repeat=2)
    assert order == ["large-only", "greedy", "greedy", "large-only", "greedy", "large-only", "large-only", "greedy"]
    assert ev.eval_runs(len(prompts), len(policies), repeat=2) == len(order)
    # large-only: min(4, 2) + min(6, 3) = 5 s; greedy: min(3, 1) + min(5, 7) = 6 s
    assert rows[0].tokens_per_s == pytest.approx(rows[0].tokens / 5.0)
    assert rows[1].tokens_per_s == pytest.approx(rows[1].tokens / 6.0)
    assert rows[1].speedup == pytest.approx(5.0 / 6.0 * rows[1].tokens / rows[0].tokens)
    calls = [0]

    def drifting(engine, chunk, params, policy, batch):
        outs, wall, split = real(engine, chunk, params, policy, batch)
        calls[0] += 1
        if calls[0] == 3:  # greedy's second run on the first prompt
            outs = [dataclasses.replace(o, token_ids=o.token_ids + [1]) for o in outs]
        return outs, wall, split
    monkeypatch.setattr(ev, "run_policy", drifting)
    with pytest.raises(RuntimeError, match="other tokens"):
        ev.evaluate(eng, prompts, policies, max_tokens=6, repeat=2)
    with pytest.raises(ValueError, match="repeat"):
        ev.evaluate(eng, prompts, policies, max_tokens=6, repeat=0)
    code, out, err = _run(capsys, "eval", "--large", large, "--small", small, "--prompts", 1, "--repeat", 0)
    assert code == 2 and "--repeat must be >= 1" in err and "Traceback" not in err


def test_bench_prints_speed_rows(capsys, tmp_path, pair_dirs):
    large, small = pair_dirs
    code, out, err = _run(capsys, "bench", "--large", large, "--small", small, "--prompts", 2, "--max-tokens", 4,
                          "--no-hf", "--out", tmp_path / "bench.csv")
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert [r["policy"].split("(")[0] for r in rows] == ["large-only", "greedy", "bild"]
    assert all(float(r["tokens_per_s"]) > 0 for r in rows) and "draft_s" in rows[0]


def test_bild_knobs_keep_the_default_policys_lookup_unless_told():
    from types import SimpleNamespace

    from bild_kernels import BiLD, NGram
    default = BiLD(fallback_threshold=0.2, rollback_threshold=2.0, max_draft_len=3, lookup=NGram(3))
    engine = SimpleNamespace(default_policy=default)

    def policy(*argv):
        return cli._policy(cli.build_parser().parse_args(["generate", "hi", *argv]), engine)

    assert policy() is default
    assert policy("--rollback-threshold", "3") == BiLD(0.2, 3.0, 3, lookup=NGram(3))
    assert policy("--rollback-threshold", "3", "--lookup", "0") == BiLD(0.2, 3.0, 3)
    assert policy("--lookup", "5", "--min-ngram", "3") == BiLD(0.2, 2.0, 3, lookup=NGram(5, min_ngram=3))
    assert policy("--policy", "greedy", "--lookup", "0").lookup is None
    with pytest.raises(cli.UsageError, match="without --lookup"):
        policy("--lookup", "0", "--max-ngram", "2")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, pair_dirs):
    """The tiny large model with a word tokenizer that has a chat template."""
    import shutil
    large, _ = pair_dirs
    chat = tmp_path_factory.mktemp("chat") / "large"
    shutil.copytree(large, chat)
    tok = word_tokenizer([f"w{i}" for i in range(90)] + ["turn", "system", "user", "assistant", "endturn"])
    tok.chat_template = ("{% for m in messages %}turn {{ m['role'] }} {{ m['content'] }} endturn {% endfor %}"
                         "{% if add_generation_prompt %}turn assistant{% endif %}")
    tok.save_pretrained(chat)
    return chat


def _chat(capsys, monkeypatch, lines, *argv):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{x}\n" for x in lines)))
    return _run(capsys, "chat", *argv)


def test_chat_keeps_the_conversation_and_forgets_it_on_reset(capsys, monkeypatch, chat_dir):
    """Each line is a user turn answered through the chat template with the turns before it (the engine's own reply
    to the same conversation), /reset forgets them, commands and blank lines are not turns."""
    from bild_kernels import Engine, SamplingParams
    code, out, err = _chat(capsys, monkeypatch, ["w1 w2", "", "/help", "w3 w4", "/reset", "w1 w2", "/exit", "w9"],
                           "--large", chat_dir, "--max-tokens", 6, "--policy", "large-only", "--system", "w5")
    assert code == 0, err
    replies = out.splitlines()
    assert len(replies) == 3 and replies[0] == replies[2]  # after /reset the same first turn, the same reply
    eng = Engine(large=str(chat_dir), max_batch_size=1, max_model_len=2048)
    sp = SamplingParams(max_tokens=6)
    sys_msg = [{"role": "system", "content": "w5"}]
    first = eng.generate([sys_msg + [{"role": "user", "content": "w1 w2"}]], sp)[0].text
    second = eng.generate([sys_msg + [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": first},
                                      {"role": "user", "content": "w3 w4"}]], sp)[0].text
    assert replies[:2] == [first, second]
    assert "unknown command /help" in err and "conversation forgotten" in err
    assert err.count("tokens/s") == 3  # a metrics line a turn, none for /exit's unread "w9"


def test_chat_leaves_out_old_turns_that_no_longer_fit(capsys, monkeypatch, chat_dir):
    lines = [" ".join(f"w{(i * 7 + j) % 90}" for j in range(12)) for i in range(5)]
    code, out, err = _chat(capsys, monkeypatch, lines, "--large", chat_dir, "--max-tokens", 4, "--max-model-len", 64,
                           "--policy", "large-only")
    assert code == 0, err
    assert len(out.splitlines()) == 5 and "oldest turns no longer fit max_model_len=64" in err


def test_chat_samples_with_a_seed_per_turn(capsys, monkeypatch, chat_dir):
    outs = []
    for _ in range(2):
        code, out, err = _chat(capsys, monkeypatch, ["w1", "w1"], "--large", chat_dir, "--max-tokens", 8,
                               "--policy", "large-only", "--temperature", 1.5, "--seed", 41)
        assert code == 0, err
        outs.append(out)
        assert " | seed 41" in err and " | seed 42" in err
    assert outs[0] == outs[1]


def test_chat_bad_input(capsys, monkeypatch, chat_dir, pair_dirs):
    large, _ = pair_dirs
    code, out, err = _chat(capsys, monkeypatch, ["w1"], "--large", large, "--policy", "large-only")
    assert code == 2 and "needs a model with a chat template" in err and "Traceback" not in err
    code, out, err = _chat(capsys, monkeypatch, ["w1"], "--large", chat_dir, "--min-p", 3)
    assert code == 2 and "min_p must be" in err
    # a turn the engine refuses (longer than max_model_len) fails alone; the next one is answered
    long = " ".join(["w3"] * 80)
    code, out, err = _chat(capsys, monkeypatch, [long, "w1 w2"], "--large", chat_dir, "--max-tokens", 4,
                           "--max-model-len", 64, "--policy", "large-only")
    assert code == 0 and "[error:" in err and "max_model_len" in err and len(out.splitlines()) == 1


def test_generate_large_weights_int8(capsys, pair_dirs, monkeypatch):
    """--large-weights int8 runs the float checkpoint's large model as int8 (lossless policies exact against it)."""
    from bild_kernels import Engine
    large, small = pair_dirs
    seen = {}
    real_init = Engine.__init__

    def spy(self, *a, **kw):
        real_init(self, *a, **kw)
        seen["format"] = self.runners["large"].executor.weight_format

    monkeypatch.setattr(Engine, "__init__", spy)
    texts = []
    for policy in ("large-only", "greedy"):
        code, out, err = _run(capsys, "generate", "w4 w8", "--large", large, "--small", small, "--max-tokens", 10,
                              "--no-chat-template", "--policy", policy, "--large-weights", "int8")
        assert code == 0, err
        texts.append(out)
    assert seen["format"] == "int8" and texts[0] == texts[1] and texts[0].split()


def test_generate_holds_the_reply_to_a_pattern(capsys, pair_dirs, tmp_path):
    """--choice / --regex / --json-schema (a file too) through SamplingParams.structured_outputs; the tiny model's
    config is given an EOS (w95), which the pattern allows where it may end."""
    large, small = pair_dirs
    eos = tmp_path / "large"
    eos.mkdir()
    for f in large.iterdir():
        (eos / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((eos / "config.json").read_text())
    (eos / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 95}))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"enum": ["x"]}))
    for flags, expect in ((["--choice", " w7 w8", "--choice", " w9"], {"w7 w8", "w9"}),
                          (["--regex", "( w1){2}"], {"w1 w1"}), (["--json-schema", str(schema)], {""})):
        code, out, err = _run(capsys, "generate", "w1 w2 w3", "--large", eos, "--small", small, "--max-tokens", 12,
                              "--no-chat-template", "--policy", "bild", *flags)
        # (w95 is a plain word of this tokenizer, but the EOS that ended the reply is not in its text; the word
        # tokenizer cannot write '"x"', so the schema's reply ends at once)
        assert code == 0 and "w95" not in out and " ".join(out.split()) in expect, (out, err)
