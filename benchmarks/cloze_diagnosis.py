"""Why does ARC-Easy fall under general replay while held-out perplexity stays at the base? (issue 27, item 1)

Trains, for ONE seed, the ``cpu-fair`` sequence SST-2 -> Wikipedia topic -> MMLU field with plain SFT and with
GeRe (the fair preset's settings and each method's learning rate selected in
``benchmarks/results/forgetting_cpu-fair.json``), keeps the final models, and compares base, plain and GeRe on the
benchmark's 500 ARC-Easy items (``gere_plugin.evaluation.general``: ``load_mc_items("arc_easy", 500)``, scored
``acc_norm``) and on held-out Wikipedia text:

* accuracy under the benchmark's scoring (``acc_norm``: summed log-probability per character), the raw summed
  log-probability (``acc``) and **calibrated** scoring (the choice's log-probability given the question minus its
  log-probability given the neutral prompt ``"Answer:"``), each with its drop from the base;
* the per-item shift of the choices' log-likelihoods (correct choice vs the mean of the wrong ones, first token
  apart from the rest, conditional and unconditional) and the flipped items (right->wrong, wrong->right);
* a **label-word prior**: the probability mass put on the tasks' label words as the next token after unrelated
  contexts (ARC-Easy prompts, held-out Wikipedia prefixes, every position of held-out Wikipedia text), and whether
  ARC-Easy choices sharing a word with the labels are favoured;
* which layers move: the mean relative L2 distance of each layer's hidden state from the base's (held-out
  Wikipedia text and ARC-Easy prompts), the per-token KL(base || model) of the next-token distribution, and each
  layer's relative weight change.

    python benchmarks/cloze_diagnosis.py --preset smoke --phase all            # end to end, meaningless numbers
    python benchmarks/cloze_diagnosis.py --phase train --method plain --threads 1 &   # side by side, one thread
    python benchmarks/cloze_diagnosis.py --phase train --method gere --threads 1 &    # each (then measures it)
    python benchmarks/cloze_diagnosis.py --phase measure --method base --threads 1
    python benchmarks/cloze_diagnosis.py --phase report                        # results/cloze_diagnosis.{json,md,png}

The train phase keeps the final model in ``WORKDIR/<preset>/<method>_seed<seed>/final`` (``run_sequence``'s
``save_final_model``) and measures it; the report phase combines the three measurement files. Results of a preset
other than ``cpu-fair`` go to ``cloze_diagnosis_<preset>.*``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment_info, set_offline_defaults  # noqa: E402

set_offline_defaults()  # before transformers / datasets are imported

import torch  # noqa: E402

logger = logging.getLogger("cloze_diagnosis")

RESULTS = Path(__file__).resolve().parent / "results"
FAIR_JSON = RESULTS / "forgetting_cpu-fair.json"
#: The neutral prompt of calibrated scoring: each choice's log-probability given it is subtracted.
NEUTRAL_PROMPT = "Answer:"
MODELS = ("base", "plain", "gere")
#: ARC-Easy items of the benchmark (``cloze: {"arc_easy": 500}`` of cpu-fair, ``load_mc_items`` seed 0).
WORD = re.compile(r"[a-z]+")


# ---------------------------------------------------------------------------------------------
# Pure measurement functions (tests/test_cloze_diagnosis.py)
# ---------------------------------------------------------------------------------------------
def argmax_first(values: Sequence[float]) -> int:
    """The index of the largest value, the first one on ties (the rule of ``cloze_accuracy``)."""
    return max(range(len(values)), key=lambda c: values[c])


def predictions(scores: Sequence[Sequence[float]], n_chars: Optional[Sequence[Sequence[int]]] = None) -> list[int]:
    """Each item's chosen choice: the highest score, or with ``n_chars`` the highest score per character
    (``acc_norm``: a choice of 0 characters counts as 1)."""
    if n_chars is None:
        return [argmax_first(s) for s in scores]
    return [argmax_first([v / max(1, n) for v, n in zip(s, c)]) for s, c in zip(scores, n_chars)]


def calibrated_scores(cond: Sequence[Sequence[float]], uncond: Sequence[Sequence[float]]) -> list[list[float]]:
    """``log p(choice | question) - log p(choice | neutral prompt)`` for every choice of every item."""
    if len(cond) != len(uncond):
        raise ValueError(f"calibrated_scores: {len(cond)} conditional items but {len(uncond)} unconditional ones")
    out = []
    for c, u in zip(cond, uncond):
        if len(c) != len(u):
            raise ValueError(f"calibrated_scores: an item has {len(c)} conditional and {len(u)} unconditional scores")
        out.append([a - b for a, b in zip(c, u)])
    return out


def accuracy(preds: Sequence[int], golds: Sequence[int]) -> float:
    """Share of items whose prediction is the gold index."""
    if not golds or len(preds) != len(golds):
        raise ValueError(f"accuracy: {len(preds)} predictions for {len(golds)} gold answers")
    return sum(int(p == g) for p, g in zip(preds, golds)) / len(golds)


def flip_counts(base_preds: Sequence[int], new_preds: Sequence[int], golds: Sequence[int]) -> dict[str, Any]:
    """Items right under the base and wrong after training (``right_to_wrong``) and the reverse, as counts and
    shares of all items; ``net`` = wrong_to_right - right_to_wrong (= the accuracy change times ``n``)."""
    if not (len(base_preds) == len(new_preds) == len(golds)) or not golds:
        raise ValueError("flip_counts: base, new and gold lists must be non-empty and of one length")
    r2w = sum(int(b == g and n != g) for b, n, g in zip(base_preds, new_preds, golds))
    w2r = sum(int(b != g and n == g) for b, n, g in zip(base_preds, new_preds, golds))
    changed = sum(int(b != n) for b, n in zip(base_preds, new_preds))
    n = len(golds)
    return {"n": n, "right_to_wrong": r2w, "wrong_to_right": w2r, "net": w2r - r2w, "changed_choice": changed,
            "right_to_wrong_share": r2w / n, "wrong_to_right_share": w2r / n, "changed_share": changed / n}


def choice_shift(base: Sequence[Sequence[float]], new: Sequence[Sequence[float]],
                 golds: Sequence[int]) -> dict[str, float]:
    """Mean over items of the change of the correct choice's score, of the mean change of the wrong choices'
    scores, and of the margin (correct minus mean wrong); ``all_choices``: mean change of every choice."""
    if not (len(base) == len(new) == len(golds)) or not golds:
        raise ValueError("choice_shift: base, new and gold lists must be non-empty and of one length")
    correct, wrong, every = [], [], []
    for b, n, g in zip(base, new, golds):
        d = [y - x for x, y in zip(b, n)]
        others = [v for i, v in enumerate(d) if i != g]
        correct.append(d[g])
        wrong.append(sum(others) / len(others))
        every.extend(d)
    m = len(golds)
    return {"correct": sum(correct) / m, "wrong": sum(wrong) / m,
            "margin": sum(c - w for c, w in zip(correct, wrong)) / m, "all_choices": sum(every) / len(every)}


def label_mass(label_logprobs: torch.Tensor, groups: dict[str, Sequence[int]]) -> dict[str, float]:
    """Mean (over contexts) probability mass on label words: ``label_logprobs[n, k]`` is log p(label token k | context
    n); ``groups`` maps a name to the columns summed for it (e.g. one task's label words); ``all`` sums every
    column (give each token once)."""
    if label_logprobs.ndim != 2 or label_logprobs.shape[0] == 0:
        raise ValueError("label_mass needs a non-empty [contexts, labels] tensor")
    p = label_logprobs.double().exp()
    out = {name: float(p[:, list(cols)].sum(-1).mean()) for name, cols in groups.items()}
    out["all"] = float(p.sum(-1).mean())
    return out


def without_label_mass(cond: Sequence[Sequence[float]], mass: Sequence[float]) -> list[list[float]]:
    """Choice scores with the label words' next-token mass taken out of the answer's first token: the first
    token's probability renormalised over the non-label tokens, ``log p - log(1 - mass)``, for every choice of an
    item whose label mass (after its context) is ``mass[i]`` (choices starting with a label word are rare; they
    are shifted alike)."""
    if len(cond) != len(mass):
        raise ValueError(f"without_label_mass: {len(cond)} items but {len(mass)} label masses")
    out = []
    for scores, m in zip(cond, mass):
        if not 0.0 <= m < 1.0:
            raise ValueError(f"without_label_mass: label mass {m} is outside [0, 1)")
        out.append([v - math.log1p(-m) for v in scores])
    return out


def label_words_of(text: str) -> set[str]:
    """Lower-case alphabetic words of ``text``."""
    return set(WORD.findall(text.lower()))


def shares_label_word(choice: str, labels: set[str]) -> bool:
    """Whether ``choice`` contains one of the ``labels`` (lower-case words) as a whole word."""
    return bool(label_words_of(choice) & labels)


def relative_l2_sums(hidden: torch.Tensor, base_hidden: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum over the masked tokens of ``||h - h_base|| / ||h_base||`` (``[B, T, D]`` states, ``[B, T]`` mask) and
    the number of tokens summed."""
    diff = (hidden.float() - base_hidden.float()).norm(dim=-1)
    ref = base_hidden.float().norm(dim=-1).clamp_min(1e-12)
    m = mask.bool()
    return float((diff / ref)[m].sum()), int(m.sum())


def mean_kl(base_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum over masked positions of KL(p_base || p_model) of the next-token distributions, and the count."""
    lb = torch.log_softmax(base_logits.float(), dim=-1)
    lm = torch.log_softmax(logits.float(), dim=-1)
    kl = (lb.exp() * (lb - lm)).sum(-1)
    m = mask.bool()
    return float(kl[m].sum()), int(m.sum())


def length_bucket(n_tokens: int) -> str:
    """The choice-length bucket of the shift table."""
    return "1 token" if n_tokens <= 1 else ("2-3 tokens" if n_tokens <= 3 else "4+ tokens")


# ---------------------------------------------------------------------------------------------
# Model passes
# ---------------------------------------------------------------------------------------------
def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos]`` when the tokenizer prepends BOS by itself, else ``[]`` (as the benchmark's scorer does)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if probe and probe[0] == bos else []


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def choice_token_logprobs(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                          max_length: int = 512, batch_size: int = 16,
                          label_ids: Optional[Sequence[int]] = None,
                          ) -> tuple[list[list[float]], Optional[torch.Tensor], torch.Tensor]:
    """Per-token log-probabilities of each continuation after its context, encoded as
    :func:`gere_plugin.evaluation.scoring.continuation_logprobs` encodes them (their sums are its scores), and with
    ``label_ids`` the log-probabilities of those tokens as the continuation's first token (``[pairs, labels]``),
    and the mean over the pairs of the next-token distribution after the context (``[vocab]``).
    The output head runs only on the positions that predict a continuation token."""
    from gere_plugin.evaluation.scoring import eval_mode
    from gere_plugin.model.introspection import model_device, pad_token_id
    from gere_plugin.ops.padding import pad_sequences

    bos = bos_prefix(tokenizer)
    start = bos or [int(getattr(tokenizer, "eos_token_id", 0) or 0)]
    encoded: list[tuple[list[int], int]] = []
    for context, continuation in pairs:
        cont = _ids(tokenizer, continuation)
        ctx = (bos + _ids(tokenizer, context)) if context else list(start)
        seq = ((ctx or list(start)) + cont)[-max_length:]
        encoded.append((seq, len(cont)))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    device, pad = model_device(model), pad_token_id(tokenizer)
    out: list[list[float]] = [[] for _ in encoded]
    labels = None if label_ids is None else torch.empty((len(pairs), len(label_ids)), dtype=torch.float32)
    wanted = None if label_ids is None else torch.tensor(list(label_ids), dtype=torch.long)
    body, head = model.get_decoder(), model.get_output_embeddings()
    first_sum: Optional[torch.Tensor] = None
    with eval_mode(model):
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            ids, mask = pad_sequences([encoded[i][0] for i in idx], pad)
            hidden = body(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            for row, i in enumerate(idx):
                seq, n = encoded[i]
                logp = torch.log_softmax(head(hidden[row, len(seq) - n - 1:len(seq) - 1]).float(), dim=-1)
                target = ids[row, len(seq) - n:len(seq)].to(logp.device)
                out[i] = [float(v) for v in logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)]
                if labels is not None and wanted is not None:
                    labels[i] = logp[0, wanted.to(logp.device)].cpu()
                p0 = logp[0].double().exp().cpu()
                first_sum = p0 if first_sum is None else first_sum + p0
    assert first_sum is not None
    return out, labels, first_sum / len(pairs)


def grouped(flat: Sequence[Any], sizes: Sequence[int]) -> list[list[Any]]:
    """``flat`` cut into consecutive groups of ``sizes``."""
    out, pos = [], 0
    for k in sizes:
        out.append(list(flat[pos:pos + k]))
        pos += k
    return out


def label_token_table(tokenizer: Any, tasks: Sequence[Any]) -> tuple[list[str], list[int], dict[str, list[int]]]:
    """The tasks' label words (each a single token), their ids, and each task's columns."""
    words: list[str] = []
    groups: dict[str, list[int]] = {}
    for task in tasks:
        cols = []
        for w in task.test[0].label_words:
            if w not in words:
                words.append(w)
            cols.append(words.index(w))
        groups[task.name] = cols
    ids = []
    for w in words:
        toks = _ids(tokenizer, w)
        if len(toks) != 1:
            raise ValueError(f"label word {w!r} is {len(toks)} tokens; the label-mass measure needs single tokens")
        ids.append(int(toks[0]))
    return words, ids, groups


def text_passes(model: torch.nn.Module, base: Optional[torch.nn.Module], tokenizer: Any, texts: Sequence[str],
                label_ids: Sequence[int], max_length: int, batch_size: int = 8) -> dict[str, Any]:
    """One pass over ``texts``: per layer, the mean relative L2 distance of the hidden states from ``base``'s
    (BOS excluded), the mean per-token KL(base || model), the mean NLL, and the label-word log-probabilities at
    every position (averaged mass)."""
    from gere_plugin.evaluation.scoring import eval_mode
    from gere_plugin.model.introspection import pad_token_id
    from gere_plugin.ops.padding import pad_sequences

    bos = bos_prefix(tokenizer)
    seqs = [(bos + _ids(tokenizer, t))[:max_length] for t in texts]
    pad = pad_token_id(tokenizer)
    wanted = torch.tensor(list(label_ids), dtype=torch.long)
    layer_sum: list[float] = []
    layer_n: list[int] = []
    kl_sum, kl_n, nll_sum, nll_n = 0.0, 0, 0.0, 0
    label_lp: list[torch.Tensor] = []
    models = [model] + ([base] if base is not None else [])
    with eval_mode(model):
        if base is not None:
            base.eval()
        for s in range(0, len(seqs), batch_size):
            ids, mask = pad_sequences(seqs[s:s + batch_size], pad)
            outs = [m(input_ids=ids, attention_mask=mask, output_hidden_states=True) for m in models]
            out = outs[0]
            keep = mask.clone()
            if bos:
                keep[:, 0] = 0  # the BOS position's huge-norm state would dominate nothing useful
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            label_lp.append(logp[mask.bool()][:, wanted])
            tgt = mask[:, 1:].bool()
            nll = -logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            nll_sum += float(nll[tgt].sum())
            nll_n += int(tgt.sum())
            if base is not None:
                ref = outs[1]
                if not layer_sum:
                    layer_sum, layer_n = [0.0] * len(out.hidden_states), [0] * len(out.hidden_states)
                for j, (h, hb) in enumerate(zip(out.hidden_states, ref.hidden_states)):
                    a, n = relative_l2_sums(h, hb, keep)
                    layer_sum[j] += a
                    layer_n[j] += n
                a, n = mean_kl(ref.logits, out.logits, mask)
                kl_sum += a
                kl_n += n
    res: dict[str, Any] = {"texts": len(seqs), "tokens": nll_n, "nll": nll_sum / max(nll_n, 1),
                           "ppl": math.exp(nll_sum / max(nll_n, 1)), "label_logprobs": torch.cat(label_lp)}
    if base is not None:
        res["layer_rel_l2"] = [a / max(n, 1) for a, n in zip(layer_sum, layer_n)]
        res["kl_base_model"] = kl_sum / max(kl_n, 1)
    return res


def weight_change(model: torch.nn.Module, base: torch.nn.Module) -> dict[str, float]:
    """Relative Frobenius change ``||W - W_base|| / ||W_base||`` per decoder layer (all its weights together),
    for the embeddings and for the final norm / head."""
    base_sd = base.state_dict()
    diff: dict[str, float] = {}
    ref: dict[str, float] = {}
    for name, w in model.state_dict().items():
        m = re.search(r"layers\.(\d+)\.", name)
        key = f"layer {int(m.group(1)) + 1}" if m else ("embeddings" if "embed" in name else "norm/head")
        b = base_sd[name].float()
        diff[key] = diff.get(key, 0.0) + float((w.float() - b).pow(2).sum())
        ref[key] = ref.get(key, 0.0) + float(b.pow(2).sum())
    return {k: math.sqrt(diff[k]) / max(math.sqrt(ref[k]), 1e-12) for k in diff}


def wiki_prefixes(texts: Sequence[str], chars: int = 200) -> list[str]:
    """Each text cut at the last word boundary before ``chars`` characters (a mid-sentence context)."""
    out = []
    for t in texts:
        t = " ".join(t.split())
        out.append(t if len(t) <= chars else t[:chars].rsplit(" ", 1)[0])
    return out


# ---------------------------------------------------------------------------------------------
# Set-up shared by the phases
# ---------------------------------------------------------------------------------------------
def setup(args: argparse.Namespace) -> dict[str, Any]:
    """The preset's model, tasks, replay file, held-out texts and ARC-Easy items (as benchmarks/forgetting.py)."""
    import forgetting

    from gere_plugin import assets
    from gere_plugin.evaluation.general import load_mc_items

    cfg = dict(forgetting.PRESETS[args.preset])
    model_dir = assets.prepare_smollm2()
    splits = assets.wikipedia_splits(replay_size=cfg["replay_size"], seed=args.data_seed)
    tasks = forgetting.build_tasks(cfg, splits, args.data_seed)
    n_arc = args.arc_items or cfg["cloze"]["arc_easy"]
    arc = load_mc_items("arc_easy", limit=n_arc, seed=0)  # general_eval_config's items (seed 0)
    return {"cfg": cfg, "model_dir": model_dir, "splits": splits, "tasks": tasks, "arc": arc,
            "wiki": [a.text for a in splits.heldout[:cfg["wiki_texts"]]], "forgetting": forgetting}


def work_dir(args: argparse.Namespace) -> Path:
    return Path(args.workdir) / args.preset


def selected_lr(args: argparse.Namespace, cfg: dict[str, Any], method: str) -> tuple[float, bool, str]:
    """The method's learning rate and bf16 flag: cpu-fair's recorded selection, else the grid's middle value."""
    if args.preset == "cpu-fair":
        fair = json.loads(FAIR_JSON.read_text(encoding="utf-8"))
        lr = float(fair["lr_selection"][method]["chosen"])
        run = next(r for r in fair["runs"] if r["method"] == method and r["seed"] == args.seed)
        return lr, bool(run["settings"]["bf16"]), f"{FAIR_JSON.name}: lr_selection.{method}.chosen"
    grid = cfg["lr_grid"]
    return float(grid[len(grid) // 2]), bool(cfg.get("bf16", False)), "the preset grid's middle value"


def train(args: argparse.Namespace, env: dict[str, Any]) -> Path:
    """Train the sequence with ``args.method`` for seed ``args.seed``; keep the final model; write its record."""
    from gere_plugin import assets
    from gere_plugin.continual import run_sequence

    forgetting, cfg = env["forgetting"], env["cfg"]
    lr, bf16, source = selected_lr(args, cfg, args.method)
    settings = forgetting.preset_settings(cfg, cfg["steps"], data_seed=args.data_seed, bf16=bf16)
    settings = dataclasses.replace(settings, learning_rate=lr, print_logs=False)
    out = work_dir(args) / f"{args.method}_seed{args.seed}"
    base_eval = None
    if args.preset == "cpu-fair":  # the benchmark's base evaluation of the same tasks: no need to redo it
        base_eval = {"tasks": json.loads(FAIR_JSON.read_text(encoding="utf-8"))["base"]["tasks"]}
    t0 = time.perf_counter()
    result = run_sequence(str(env["model_dir"]), env["tasks"], args.method, out, settings=settings,
                          replay=assets.replay_jsonl(env["splits"]), state_cache=work_dir(args) / "states",
                          seed=args.seed, general=None, base_eval=base_eval, save_final_model=True)
    record = {"method": args.method, "seed": args.seed, "learning_rate": lr, "lr_source": source, "bf16": bf16,
              "tasks": result["tasks"], "matrix": result["matrix"], "base_row": result["base_row"],
              "summary": result["summary"], "train_seconds": time.perf_counter() - t0,
              "final_model": str(out / "final"), "settings": dataclasses.asdict(settings)}
    (out / "train_record.json").write_text(json.dumps(record, indent=2, default=float), encoding="utf-8")
    logger.info("%s trained in %.0fs: matrix %s", args.method, record["train_seconds"], result["matrix"])
    return out / "final"


def measure(args: argparse.Namespace, env: dict[str, Any], name: str) -> Path:
    """Every per-model measurement of ``name`` (base, plain or gere), raw, to ``WORKDIR/measure_<name>.json``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(env["model_dir"]))
    base = AutoModelForCausalLM.from_pretrained(str(env["model_dir"]), dtype=torch.float32)
    if name == "base":
        model, ref = base, None
    else:
        folder = work_dir(args) / f"{name}_seed{args.seed}" / "final"
        if not (folder / "config.json").is_file():
            raise SystemExit(f"measure {name}: {folder} has no model; run --phase train --method {name} first")
        model, ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32), base
    arc = env["arc"]
    pairs = [(it.context, ch) for it in arc for ch in it.choices]
    words, ids, groups = label_token_table(tok, env["tasks"])
    cond, pair_labels, first_dist = choice_token_logprobs(model, tok, pairs, batch_size=args.batch_size, label_ids=ids)
    torch.save(first_dist, work_dir(args) / f"answer_dist_{name}.pt")
    uncond, _, _ = choice_token_logprobs(model, tok, [(NEUTRAL_PROMPT, ch) for _, ch in pairs], batch_size=args.batch_size)
    assert pair_labels is not None
    firsts = [sum(len(it.choices) for it in arc[:k]) for k in range(len(arc))]
    arc_next = pair_labels[firsts]  # the next-token distribution after each item's context (its first choice's row)
    from gere_plugin.evaluation.scoring import next_token_logprobs

    prefixes = wiki_prefixes(env["wiki"])
    wiki_next = next_token_logprobs(model, tok, prefixes, ids, batch_size=args.batch_size)
    max_len = env["cfg"]["ppl_max_length"]
    wiki_pass = text_passes(model, ref, tok, env["wiki"], ids, max_len)
    arc_pass = text_passes(model, ref, tok, [it.context for it in arc[:args.drift_items]], ids, max_len)
    rec: dict[str, Any] = {
        "name": name, "seconds": None, "label_words": words, "label_groups": groups,
        "arc": {"cond": cond, "uncond": uncond, "n_chars": [len(ch) for _, ch in pairs],
                "sizes": [len(it.choices) for it in arc], "gold": [it.gold for it in arc]},
        "arc_next_label_mass": [float(v) for v in arc_next.double().exp().sum(-1)],
        "label_mass": {"arc_next": label_mass(arc_next, groups), "wiki_prefix_next": label_mass(wiki_next, groups),
                       "wiki_all_positions": label_mass(wiki_pass["label_logprobs"], groups),
                       "arc_prompt_all_positions": label_mass(arc_pass["label_logprobs"], groups),
                       "arc_next_per_word": {w: float(arc_next[:, k].exp().mean()) for k, w in enumerate(words)}},
        "wiki": {k: v for k, v in wiki_pass.items() if k != "label_logprobs"},
        "arc_prompts": {k: v for k, v in arc_pass.items() if k != "label_logprobs"},
    }
    if ref is not None:
        rec["weight_change"] = weight_change(model, base)
    rec["seconds"] = time.perf_counter() - t0
    path = work_dir(args) / f"measure_{name}.json"
    path.write_text(json.dumps(rec, default=float), encoding="utf-8")
    logger.info("measured %s in %.0fs -> %s", name, rec["seconds"], path)
    return path


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def scored(rec: dict[str, Any]) -> dict[str, Any]:
    """A model's ARC-Easy scores per item: summed, first-token and rest log-probabilities, calibrated."""
    a = rec["arc"]
    sizes = a["sizes"]
    cond = grouped([sum(t) for t in a["cond"]], sizes)
    uncond = grouped([sum(t) for t in a["uncond"]], sizes)
    return {
        "cond": cond, "uncond": uncond, "n_chars": grouped(a["n_chars"], sizes),
        "n_tokens": grouped([len(t) for t in a["cond"]], sizes),
        "first": grouped([t[0] for t in a["cond"]], sizes), "rest": grouped([sum(t[1:]) for t in a["cond"]], sizes),
        "per_char": [[v / max(1, n) for v, n in zip(s, c)] for s, c in zip(cond, grouped(a["n_chars"], sizes))],
        "calibrated": calibrated_scores(cond, uncond), "gold": a["gold"],
        "no_label_mass": without_label_mass(cond, rec["arc_next_label_mass"]),
    }


SCORINGS = {
    "acc_norm": "benchmark (summed log-prob / characters)",
    "acc": "summed log-prob",
    "calibrated": f"calibrated (log p(choice given the question) - log p(choice given '{NEUTRAL_PROMPT}'))",
    "acc_norm_no_label_mass": "benchmark, label words' next-token mass taken out of the first token",
    "acc_norm_base_first_token": "benchmark, with the base's log-prob of each answer's first token",
}


def model_predictions(s: dict[str, Any]) -> dict[str, list[int]]:
    return {"acc_norm": predictions(s["cond"], s["n_chars"]), "acc": predictions(s["cond"]),
            "calibrated": predictions(s["calibrated"]),
            "acc_norm_no_label_mass": predictions(s["no_label_mass"], s["n_chars"]),
            "acc_norm_base_first_token": predictions(s["base_first"], s["n_chars"])}


def label_share_items(base: dict[str, Any], arc_choices: list[list[str]], labels: set[str]) -> list[int]:
    """Items with at least one choice sharing a word with the labels and one not sharing any."""
    out = []
    for i, choices in enumerate(arc_choices):
        flags = [shares_label_word(c, labels) for c in choices]
        if any(flags) and not all(flags):
            out.append(i)
    return out


def top_gains(dist: torch.Tensor, base_dist: torch.Tensor, k: int = 12) -> list[tuple[int, float, float]]:
    """The ``k`` tokens whose mean probability rose most from ``base_dist`` to ``dist``: (id, base, model)."""
    gain = dist.double() - base_dist.double()
    top = torch.topk(gain, k).indices.tolist()
    return [(int(i), float(base_dist[i]), float(dist[i])) for i in top]


def answer_gains(args: argparse.Namespace, env: dict[str, Any], label_words: Sequence[str]) -> Optional[dict[str, Any]]:
    """Which next tokens after the ARC-Easy prompts gained probability (mean over the scored pairs), and how much of
    the total gain the label words hold."""
    paths = {n: work_dir(args) / f"answer_dist_{n}.pt" for n in MODELS}
    if not all(p.is_file() for p in paths.values()):
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(env["model_dir"]))
    dists = {n: torch.load(p) for n, p in paths.items()}
    ids = [int(_ids(tok, w)[0]) for w in label_words]
    out: dict[str, Any] = {}
    for n in MODELS[1:]:
        gain = (dists[n] - dists["base"]).clamp_min(0)
        out[n] = {
            "total_positive_gain": float(gain.sum()),
            "label_words_share_of_gain": float(gain[ids].sum() / max(float(gain.sum()), 1e-12)),
            "top": [{"token": tok.decode([i]), "base": b, "model": m} for i, b, m in top_gains(dists[n], dists["base"])],
        }
    return out


def build_report(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    recs = {}
    for name in MODELS:
        path = work_dir(args) / f"measure_{name}.json"
        if not path.is_file():
            raise SystemExit(f"report: {path} is missing; run --phase measure --method {name} (or train) first")
        recs[name] = json.loads(path.read_text(encoding="utf-8"))
    train_recs = {}
    for name in MODELS[1:]:
        p = work_dir(args) / f"{name}_seed{args.seed}" / "train_record.json"
        train_recs[name] = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
    s = {n: scored(recs[n]) for n in MODELS}
    for n in MODELS:  # counterfactual: the model's scores with the base's first-token log-probabilities
        s[n]["base_first"] = [[c - f + b for c, f, b in zip(ci, fi, bi)]
                              for ci, fi, bi in zip(s[n]["cond"], s[n]["first"], s["base"]["first"])]
    preds = {n: model_predictions(s[n]) for n in MODELS}
    gold = s["base"]["gold"]
    acc = {n: {k: accuracy(v, gold) for k, v in preds[n].items()} for n in MODELS}
    drops = {n: {k: acc["base"][k] - acc[n][k] for k in SCORINGS} for n in MODELS[1:]}
    flips = {n: {k: flip_counts(preds["base"][k], preds[n][k], gold) for k in SCORINGS} for n in MODELS[1:]}
    shifts: dict[str, Any] = {}
    for n in MODELS[1:]:
        shifts[n] = {
            "per_char (acc_norm's score)": choice_shift(s["base"]["per_char"], s[n]["per_char"], gold),
            "summed log-prob": choice_shift(s["base"]["cond"], s[n]["cond"], gold),
            "first token": choice_shift(s["base"]["first"], s[n]["first"], gold),
            "tokens after the first": choice_shift(s["base"]["rest"], s[n]["rest"], gold),
            f"unconditional (after '{NEUTRAL_PROMPT}')": choice_shift(s["base"]["uncond"], s[n]["uncond"], gold),
            "calibrated": choice_shift(s["base"]["calibrated"], s[n]["calibrated"], gold),
        }
    # by choice length: mean shift of the summed log-prob per token-length bucket, and the chosen answer's length
    by_length: dict[str, Any] = {}
    for n in MODELS[1:]:
        buckets: dict[str, list[float]] = {}
        for b_items, n_items, toks in zip(s["base"]["cond"], s[n]["cond"], s["base"]["n_tokens"]):
            for x, y, k in zip(b_items, n_items, toks):
                buckets.setdefault(length_bucket(k), []).append((y - x) / k)
        by_length[n] = {k: {"choices": len(v), "mean_shift_per_token": sum(v) / len(v)} for k, v in sorted(buckets.items())}
    chosen_len = {n: sum(s["base"]["n_tokens"][i][p] for i, p in enumerate(preds[n]["acc_norm"])) / len(gold)
                  for n in MODELS}
    gold_len = sum(s["base"]["n_tokens"][i][g] for i, g in enumerate(gold)) / len(gold)
    # the label-word prior and choices that share words with the labels
    labels = {w.strip().lower() for w in recs["base"]["label_words"]}
    arc_choices = [list(it.choices) for it in env["arc"]]
    overlap_items = label_share_items(s["base"], arc_choices, labels)
    overlap: dict[str, Any] = {"labels": sorted(labels), "items": len(overlap_items),
                               "examples": [arc_choices[i] for i in overlap_items[:5]]}
    for n in MODELS:
        picks = [int(shares_label_word(arc_choices[i][preds[n]["acc_norm"][i]], labels)) for i in overlap_items]
        overlap[n] = {"share_choosing_label_choice": sum(picks) / len(picks) if picks else None,
                      "accuracy": (sum(int(preds[n]["acc_norm"][i] == gold[i]) for i in overlap_items)
                                   / len(overlap_items)) if overlap_items else None}
    gold_label = [int(shares_label_word(arc_choices[i][gold[i]], labels)) for i in overlap_items]
    overlap["share_gold_is_label_choice"] = sum(gold_label) / len(gold_label) if gold_label else None
    for n in MODELS[1:]:
        lab, other = [], []
        for i in overlap_items:
            for c, ch in enumerate(arc_choices[i]):
                d = s[n]["per_char"][i][c] - s["base"]["per_char"][i][c]
                (lab if shares_label_word(ch, labels) else other).append(d)
        overlap[n]["shift_label_choices"] = sum(lab) / len(lab) if lab else None
        overlap[n]["shift_other_choices"] = sum(other) / len(other) if other else None
    label_prior = {n: recs[n]["label_mass"] for n in MODELS}
    gains = answer_gains(args, env, recs["base"]["label_words"])
    drift = {n: {"wiki": recs[n]["wiki"], "arc_prompts": recs[n]["arc_prompts"],
                 "weight_change": recs[n].get("weight_change")} for n in MODELS[1:]}
    ppl = {n: {"wiki": recs[n]["wiki"]["ppl"], "arc_prompts": recs[n]["arc_prompts"]["ppl"]} for n in MODELS}
    doc = {
        "preset": args.preset, "seed": args.seed, "environment": environment_info(),
        "settings": {"arc_easy_items": len(gold), "arc_source": "load_mc_items('arc_easy', limit=N, seed=0), as "
                     "assets.general_eval_config", "neutral_prompt": NEUTRAL_PROMPT,
                     "wiki_heldout_texts": recs["base"]["wiki"]["texts"], "drift_arc_prompts": recs["base"]["arc_prompts"]["texts"],
                     "ppl_max_length": env["cfg"]["ppl_max_length"], "label_words": recs["base"]["label_words"],
                     "label_groups": recs["base"]["label_groups"], "tasks": [t.name for t in env["tasks"]]},
        "training": train_recs,
        "accuracy": acc, "drop_vs_base": drops, "flips": flips, "shifts": shifts,
        "shift_by_choice_length": by_length,
        "chosen_answer_tokens": {**chosen_len, "gold": gold_len},
        "label_prior": label_prior, "answer_cue_gains": gains, "label_overlap": overlap, "perplexity": ppl, "drift": drift,
        "measure_seconds": {n: recs[n]["seconds"] for n in MODELS},
    }
    if args.preset == "cpu-fair" and FAIR_JSON.is_file():
        fair = json.loads(FAIR_JSON.read_text(encoding="utf-8"))
        doc["benchmark_runs"] = {
            r["method"]: {"matrix": r["matrix"], "arc_easy": r["final"].get("general", {}).get("cloze", {}).get("arc_easy")}
            for r in fair["runs"] if r["seed"] == args.seed and r["method"] in MODELS}
        doc["benchmark_runs"]["base"] = {"arc_easy": fair["base"]["general"]["cloze"]["arc_easy"]}
    doc["findings"] = findings(doc)
    return doc


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def findings(doc: dict[str, Any]) -> dict[str, Any]:
    """Numbers the implications are read from (each a plain ratio or difference of the tables' numbers)."""
    out: dict[str, Any] = {}
    for n in MODELS[1:]:
        d = doc["drop_vs_base"][n]
        out[n] = {
            "drop_acc_norm": d["acc_norm"], "drop_calibrated": d["calibrated"], "drop_acc": d["acc"],
            "calibration_removes_share_of_drop": (1 - d["calibrated"] / d["acc_norm"]) if d["acc_norm"] > 0 else None,
            "drop_acc_norm_no_label_mass": d["acc_norm_no_label_mass"],
            "drop_acc_norm_base_first_token": d["acc_norm_base_first_token"],
            "label_mass_removal_removes_share_of_drop": ((1 - d["acc_norm_no_label_mass"] / d["acc_norm"])
                                                         if d["acc_norm"] > 0 else None),
            "margin_shift_per_char": doc["shifts"][n]["per_char (acc_norm's score)"]["margin"],
            "margin_shift_first_token": doc["shifts"][n]["first token"]["margin"],
            "margin_shift_rest": doc["shifts"][n]["tokens after the first"]["margin"],
            "label_mass_arc_next_ratio": (doc["label_prior"][n]["arc_next"]["all"]
                                          / max(doc["label_prior"]["base"]["arc_next"]["all"], 1e-12)),
            "label_mass_wiki_all_ratio": (doc["label_prior"][n]["wiki_all_positions"]["all"]
                                          / max(doc["label_prior"]["base"]["wiki_all_positions"]["all"], 1e-12)),
        }
        layers = doc["drift"][n]["wiki"]["layer_rel_l2"]
        top = sorted(range(len(layers)), key=lambda j: -layers[j])[:3]
        out[n]["top_drift_layers_wiki"] = top
        half = len(layers) // 2
        out[n]["drift_upper_half_over_lower_half"] = (sum(layers[half:]) / max(sum(layers[1:half]), 1e-12)
                                                      * (half - 1) / (len(layers) - half))
    return out


def layer_name(j: int, n: int) -> str:
    """Hidden-state index ``j`` of ``n`` (HF: embeddings, then each decoder layer's output, the last normed)."""
    return "embeddings" if j == 0 else (f"layer {j} (final norm)" if j == n - 1 else f"layer {j}")


def markdown(doc: dict[str, Any]) -> str:
    acc, drops, env = doc["accuracy"], doc["drop_vs_base"], doc["environment"]
    smoke = doc["preset"] != "cpu-fair"
    lines = [f"# Cloze diagnosis: why ARC-Easy drops while held-out perplexity stays ({doc['preset']}, seed {doc['seed']})", ""]
    if smoke:
        lines += [f"**{doc['preset'].upper()} RUN: a check of the script end to end; the numbers mean nothing.**", ""]
    lines += [
        f"SmolLM2-135M trained on {' -> '.join(doc['settings']['tasks'])} with plain SFT and with GeRe (the "
        f"`{doc['preset']}` settings of `benchmarks/forgetting.py`, each method's selected learning rate), seed "
        f"{doc['seed']}; {doc['settings']['arc_easy_items']} ARC-Easy items of the benchmark, "
        f"{doc['settings']['wiki_heldout_texts']} held-out Wikipedia texts. Reproduce (2 CPU cores, one thread "
        "per process; the trainings took 13-16 min each, each measurement 4-5 min):", "",
        "```",
        "python benchmarks/cloze_diagnosis.py --phase train --method plain --threads 1 &   # trains, keeps, measures",
        "python benchmarks/cloze_diagnosis.py --phase train --method gere --threads 1 &",
        "python benchmarks/cloze_diagnosis.py --phase measure --method base --threads 1",
        "python benchmarks/cloze_diagnosis.py --phase report",
        "```", "",
        f"Machine: {env.get('cpu_count')} CPU ({env.get('cpu_model')}), torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}, trl {env.get('trl')}.", "",
    ]
    tr = doc["training"]
    if any(tr.values()):
        lines += ["## The trained models", "", "| model | lr | bf16 | plasticity (acc right after each task) | final accuracies | BWT | train s |",
                  "|---|---|---|---|---|---|---|"]
        for n in MODELS[1:]:
            r = tr.get(n)
            if r:
                plast = [r["matrix"][k][k] for k in range(len(r["matrix"]))]
                lines.append(f"| {n} | {r['learning_rate']:g} | {r['bf16']} | {', '.join(_pct(v) for v in plast)} | "
                             f"{', '.join(_pct(v) for v in r['matrix'][-1])} | {_pct(r['summary'].get('BWT'))} | "
                             f"{r['train_seconds']:.0f} |")
        lines.append("")
    lines += ["## 1. ARC-Easy accuracy by scoring rule (%)", "",
              "| scoring | base | plain | GeRe | plain drop | GeRe drop |", "|---|---|---|---|---|---|"]
    for k, desc in SCORINGS.items():
        lines.append(f"| {desc} | {_pct(acc['base'][k])} | {_pct(acc['plain'][k])} | {_pct(acc['gere'][k])} | "
                     f"{_pct(drops['plain'][k])} | {_pct(drops['gere'][k])} |")
    bench = doc.get("benchmark_runs")
    if bench:
        lines += ["", f"The benchmark's own seed-{doc['seed']} runs (`forgetting_cpu-fair.json`) recorded ARC-Easy acc_norm "
                  + ", ".join(f"{n} {_pct(bench[n]['arc_easy'])}" for n in MODELS if n in bench)
                  + "; their final task accuracies: "
                  + "; ".join(f"{n} {', '.join(_pct(v) for v in bench[n]['matrix'][-1])}" for n in MODELS[1:] if n in bench)
                  + "."]
    ppl = doc["perplexity"]
    lines += ["", f"Held-out Wikipedia perplexity (this script's pass, {doc['settings']['ppl_max_length']} tokens): "
              + ", ".join(f"{n} {ppl[n]['wiki']:.2f}" for n in MODELS)
              + "; on the ARC-Easy prompts: " + ", ".join(f"{n} {ppl[n]['arc_prompts']:.2f}" for n in MODELS) + ".", ""]
    lines += ["## 2. Flipped items (vs base)", "",
              "| model | scoring | right->wrong | wrong->right | net | choice changed |", "|---|---|---|---|---|---|"]
    for n in MODELS[1:]:
        for k in SCORINGS:
            f = doc["flips"][n][k]
            lines.append(f"| {n} | {k} | {f['right_to_wrong']} ({_pct(f['right_to_wrong_share'])}%) | "
                         f"{f['wrong_to_right']} ({_pct(f['wrong_to_right_share'])}%) | {f['net']:+d} | "
                         f"{f['changed_choice']} ({_pct(f['changed_share'])}%) |")
    lines += ["", "## 3. Per-item shift of the choices' log-likelihoods (model - base, nats)", "",
              "Mean over items; `wrong` is the mean over an item's wrong choices; `margin` = correct - wrong (negative: "
              "the correct choice lost ground).", "",
              "| model | score | correct | wrong | margin | all choices |", "|---|---|---|---|---|---|"]
    for n in MODELS[1:]:
        for k, v in doc["shifts"][n].items():
            lines.append(f"| {n} | {k} | {v['correct']:+.3f} | {v['wrong']:+.3f} | {v['margin']:+.3f} | {v['all_choices']:+.3f} |")
    lines += ["", "By choice length (summed log-prob shift per token):", "", "| model | length | choices | shift / token |",
              "|---|---|---|---|"]
    for n in MODELS[1:]:
        for k, v in doc["shift_by_choice_length"][n].items():
            lines.append(f"| {n} | {k} | {v['choices']} | {v['mean_shift_per_token']:+.3f} |")
    cl = doc["chosen_answer_tokens"]
    lines += ["", "Mean length (tokens) of the answer chosen by acc_norm: " + ", ".join(f"{n} {cl[n]:.2f}" for n in MODELS)
              + f"; of the gold answer {cl['gold']:.2f}.", ""]
    lp = doc["label_prior"]
    lines += ["## 4. Label-word prior: probability mass on the tasks' label words as the next token (%)", "",
              f"Label words: {', '.join(repr(w) for w in doc['settings']['label_words'])}.", "",
              "| context | group | base | plain | GeRe | plain / base | GeRe / base |", "|---|---|---|---|---|---|---|"]
    ctx_names = {"arc_next": "after an ARC-Easy prompt (`...\\nAnswer:`)",
                 "wiki_prefix_next": "after a held-out Wikipedia prefix (200 chars)",
                 "wiki_all_positions": "every position of held-out Wikipedia text",
                 "arc_prompt_all_positions": "every position of ARC-Easy prompts"}
    for ctx, desc in ctx_names.items():
        for g in [*doc["settings"]["label_groups"], "all"]:
            b, p, q = lp["base"][ctx][g], lp["plain"][ctx][g], lp["gere"][ctx][g]
            lines.append(f"| {desc} | {g} | {100 * b:.3f} | {100 * p:.3f} | {100 * q:.3f} | {p / max(b, 1e-12):.1f}x | "
                         f"{q / max(b, 1e-12):.1f}x |")
    lines += ["", "Per word after an ARC-Easy prompt (%): " + "; ".join(
        f"{w.strip()} {100 * lp['base']['arc_next_per_word'][w]:.3f} / {100 * lp['plain']['arc_next_per_word'][w]:.3f} / "
        f"{100 * lp['gere']['arc_next_per_word'][w]:.3f}" for w in doc["settings"]["label_words"]) + " (base / plain / GeRe).", ""]
    gains = doc.get("answer_cue_gains")
    if gains:
        lines += ["Which next tokens gained probability after the ARC-Easy prompts (mean next-token distribution, %):", "",
                  "| model | share of the gain on label words | top gaining tokens (base -> model) |", "|---|---|---|"]
        for n in MODELS[1:]:
            g = gains[n]
            top = ", ".join(f"`{t['token']!r}` {100 * t['base']:.2f}->{100 * t['model']:.2f}".replace("|", "\\|")
                            for t in g["top"][:8])
            lines.append(f"| {n} | {_pct(g['label_words_share_of_gain'])} (of {_pct(g['total_positive_gain'])} points "
                         f"gained) | {top} |")
        lines.append("")
    ov = doc["label_overlap"]
    lines += [f"ARC-Easy items with a choice sharing a word with the labels (and one not): {ov['items']}; gold is such a "
              f"choice in {_pct(ov['share_gold_is_label_choice'])}% of them.", "",
              "| model | picks a label-sharing choice (%) | accuracy on these items (%) | per-char shift of label-sharing choices | of the others |",
              "|---|---|---|---|---|"]
    for n in MODELS:
        o = ov[n]
        sl = o.get("shift_label_choices")
        so = o.get("shift_other_choices")
        lines.append(f"| {n} | {_pct(o['share_choosing_label_choice'])} | {_pct(o['accuracy'])} | "
                     f"{'-' if sl is None else f'{sl:+.3f}'} | {'-' if so is None else f'{so:+.3f}'} |")
    dr = doc["drift"]
    nl = len(dr["plain"]["wiki"]["layer_rel_l2"])
    lines += ["", "## 5. Which layers move: mean relative L2 distance of the hidden state from the base's", "",
              "Per token (BOS excluded), ||h - h_base|| / ||h_base||; weight change = ||W - W_base|| / ||W_base|| over the "
              "layer's weights.", "",
              "| hidden state | plain, Wikipedia | GeRe, Wikipedia | plain, ARC prompts | GeRe, ARC prompts | plain weights | GeRe weights |",
              "|---|---|---|---|---|---|---|"]
    for j in range(nl):
        wkey = "embeddings" if j == 0 else f"layer {j}"
        wp = (dr["plain"]["weight_change"] or {}).get(wkey)
        wg = (dr["gere"]["weight_change"] or {}).get(wkey)
        lines.append(f"| {layer_name(j, nl)} | {dr['plain']['wiki']['layer_rel_l2'][j]:.4f} | "
                     f"{dr['gere']['wiki']['layer_rel_l2'][j]:.4f} | {dr['plain']['arc_prompts']['layer_rel_l2'][j]:.4f} | "
                     f"{dr['gere']['arc_prompts']['layer_rel_l2'][j]:.4f} | {'-' if wp is None else f'{wp:.4f}'} | "
                     f"{'-' if wg is None else f'{wg:.4f}'} |")
    lines += ["", "Mean per-token KL(base || model) of the next-token distribution: "
              + "; ".join(f"{n}: Wikipedia {dr[n]['wiki']['kl_base_model']:.4f}, ARC prompts "
                          f"{dr[n]['arc_prompts']['kl_base_model']:.4f}" for n in MODELS[1:]) + " nats.", ""]
    lines += ["## What it implies for the method", "", *implications(doc), ""]
    return "\n".join(lines)


def implications(doc: dict[str, Any]) -> list[str]:
    """What the numbers point to: each statement names the numbers it rests on and the threshold it applies."""
    f = doc["findings"]
    out = []
    if doc["preset"] != "cpu-fair":
        out.append("- (smoke run: no conclusion may be drawn from these numbers)")
    for n in MODELS[1:]:
        x = f[n]
        share = x["calibration_removes_share_of_drop"]
        out.append(
            f"- **{n}**: ARC-Easy drop (base - model) {_pct(x['drop_acc_norm'])} points under the benchmark's scoring, "
            f"{_pct(x['drop_calibrated'])} under calibrated scoring"
            + ("" if share is None else f" (calibration removes {100 * share:.0f}% of the drop)")
            + f", {_pct(x['drop_acc_norm_no_label_mass'])} with the label words' mass taken out of the first token"
            f"; the correct choice's margin moves {x['margin_shift_per_char']:+.3f} nats/char "
            f"(first token {x['margin_shift_first_token']:+.3f}, the rest {x['margin_shift_rest']:+.3f} nats); "
            f"label-word mass after ARC prompts {x['label_mass_arc_next_ratio']:.1f}x the base's, over held-out "
            f"Wikipedia {x['label_mass_wiki_all_ratio']:.1f}x; hidden-state drift of the upper half of the layers "
            f"{x['drift_upper_half_over_lower_half']:.1f}x the lower half's (most-moved states: "
            f"{', '.join(str(j) for j in x['top_drift_layers_wiki'])})."
        )
    g = f["gere"]
    if g["drop_acc_norm"] <= 0:
        out.append("- GeRe does not lose ARC-Easy accuracy in this run: nothing to diagnose for it.")
        return out
    dr = doc["drift"]
    kl_wiki, kl_arc = dr["gere"]["wiki"]["kl_base_model"], dr["gere"]["arc_prompts"]["kl_base_model"]
    kp_wiki, kp_arc = dr["plain"]["wiki"]["kl_base_model"], dr["plain"]["arc_prompts"]["kl_base_model"]
    cut_wiki, cut_arc = 1 - kl_wiki / max(kp_wiki, 1e-12), 1 - kl_arc / max(kp_arc, 1e-12)
    out.append(
        f"- Where replay protects: GeRe's next-token KL from the base is {kl_wiki:.3f} nats/token on held-out "
        f"Wikipedia (plain {kp_wiki:.3f}: {100 * cut_wiki:.0f}% less) and {kl_arc:.3f} on the ARC-Easy prompts "
        f"(plain {kp_arc:.3f}: {100 * cut_arc:.0f}% less): "
        + ("replay protects the replayed domain clearly more than the question/answer format (a gap of 20 points or "
           "more), so general replay of plain text does not constrain the cloze format; replay rows in a "
           "question/answer or cloze format (or a KL to the base on such prompts) are indicated."
           if cut_wiki - cut_arc >= 0.2 else
           "replay protects the question/answer format about as much as the replayed domain (a gap under 20 points).")
    )
    share = g["calibration_removes_share_of_drop"]
    lm = g["label_mass_removal_removes_share_of_drop"]
    lp = doc["label_prior"]
    mass = {n: lp[n]["arc_next"]["all"] for n in MODELS}
    out.append(f"- The answer cue: after an ARC-Easy prompt (`...\\nAnswer:`) the label words hold {_pct(mass['base'])}% of the "
               f"next-token mass in the base, {_pct(mass['plain'])}% after plain SFT and {_pct(mass['gere'])}% after GeRe: "
               + ("general replay of plain text leaves this label-word prior as it is."
                  if mass["gere"] >= 0.8 * mass["plain"] else "general replay reduces it."))
    sh = doc["shifts"]["gere"]["first token"]
    if sh["all_choices"] < 0 and abs(sh["all_choices"]) >= 5 * abs(sh["margin"]):
        out.append(f"- So every choice's first token loses about the same ({sh['all_choices']:+.2f} nats on average, "
                   f"correct {sh['correct']:+.2f} vs wrong {sh['wrong']:+.2f}). A uniform loss cancels under summed "
                   f"scoring (GeRe's drop there: {_pct(g['drop_acc'])} points) but not under the benchmark's "
                   "per-character scoring, which charges it to short choices most (see the per-length shifts): "
                   f"{_pct(g['drop_acc_norm'])} points.")
    out.append(f"- Counterfactuals for GeRe: with the label words' mass taken out of the first token the drop is "
               f"{_pct(g['drop_acc_norm_no_label_mass'])} points, with the base's first-token log-probabilities "
               f"{_pct(g['drop_acc_norm_base_first_token'])}, under calibrated scoring {_pct(g['drop_calibrated'])} "
               f"(of {_pct(g['drop_acc_norm'])})"
               + (": the label-word prior at the answer cue explains most of GeRe's ARC-Easy drop; the question still "
                  "selects the answer about as well as in the base. A logit-level term at cue positions of general "
                  "(non-task) text -- e.g. a KL to the base's next-token distribution on cloze/question-answer formatted "
                  "replay rows -- is indicated; hidden-state matching on plain replay text does not reach it."
                  if lm is not None and lm >= 0.5 and g["drop_acc_norm_base_first_token"] <= 0.5 * g["drop_acc_norm"]
                  else ": the label-word prior is not the main cause."))
    p_ = f["plain"]
    out.append(f"- Plain SFT loses more than the prior: its drop is still {_pct(p_['drop_calibrated'])} points under "
               f"calibrated scoring (GeRe {_pct(g['drop_calibrated'])}) and {_pct(p_['drop_acc'])} under summed scoring "
               f"(GeRe {_pct(g['drop_acc'])}): what general replay does protect is how the question conditions the answer.")
    n_items = doc["settings"]["arc_easy_items"]
    se = math.sqrt(acc0 * (1 - acc0) / n_items) if (acc0 := doc["accuracy"]["base"]["acc_norm"]) else 0.0
    out.append(f"- Caveat: one seed and {n_items} items; one accuracy's binomial standard error is about "
               f"{100 * se:.1f} points, so differences of a few points between two models are within one run's noise. "
               f"The label-word mass after the cue ({_pct(mass['gere'])}% vs the base's {100 * mass['base']:.3f}%) is far "
               "outside it.")
    up = g["drift_upper_half_over_lower_half"]
    out.append(f"- GeRe's hidden states drift {up:.1f}x more in the upper half of the layers than in the lower half "
               + ("(the top layers move most: a layer-targeted term, e.g. replay-state matching or L2 on the top "
                  "layers, is where a regularizer would act)." if up >= 1.5 else
                  "(drift is spread over the depth: no layer-targeted fix is indicated)."))
    return out


def plot(doc: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "wiki", "held-out Wikipedia"), (axes[1], "arc_prompts", "ARC-Easy prompts")):
        for n, color in (("plain", "tab:red"), ("gere", "tab:blue")):
            ys = doc["drift"][n][key]["layer_rel_l2"]
            ax.plot(range(len(ys)), ys, marker=".", color=color, label=n)
        ax.set_title(f"hidden-state drift from base: {title}", fontsize=9)
        ax.set_xlabel("hidden state (0 = embeddings, last = final norm)")
        ax.set_ylabel("mean ||h - h_base|| / ||h_base||")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def write_report(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    doc = build_report(args, env)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "cloze_diagnosis" if args.preset == "cpu-fair" else f"cloze_diagnosis_{args.preset}"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=float), encoding="utf-8")
    (out / f"{stem}.md").write_text(markdown(doc), encoding="utf-8")
    plot(doc, out / f"{stem}.png")
    logger.info("wrote %s.{json,md,png} in %s", stem, out)
    return doc


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("cpu-fair", "smoke"), default="cpu-fair")
    p.add_argument("--phase", choices=("train", "measure", "report", "all"), default="all",
                   help="train (then measure) one method; measure one model; report; or all of it in turn")
    p.add_argument("--method", choices=MODELS, help="with --phase train (plain, gere) or measure (base too)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data-seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--batch-size", type=int, default=16, help="scoring batch size")
    p.add_argument("--arc-items", type=int, default=0, help="ARC-Easy items (0 = the preset's; fewer only to time a check)")
    p.add_argument("--drift-items", type=int, default=100, help="ARC-Easy prompts of the hidden-state pass")
    p.add_argument("--workdir", default=os.environ.get("GERE_BENCH_DIR", "/tmp/gere-cloze-diagnosis"))
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "trl", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase in ("train", "measure") and args.method is None:
        raise SystemExit(f"--phase {args.phase} needs --method ({'plain or gere' if args.phase == 'train' else 'base, plain or gere'})")
    if args.phase == "train" and args.method == "base":
        raise SystemExit("--phase train --method base: the base is not trained; use --phase measure --method base")
    work_dir(args).mkdir(parents=True, exist_ok=True)
    env = setup(args)
    if args.phase == "train":
        train(args, env)
        measure(args, env, args.method)
    elif args.phase == "measure":
        measure(args, env, args.method)
    elif args.phase == "report":
        write_report(args, env)
    else:
        for name in MODELS[1:]:
            args.method = name
            train(args, env)
        for name in MODELS:
            measure(args, env, name)
        write_report(args, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
