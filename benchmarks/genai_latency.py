"""onnxruntime-genai generation latency: base, the builder's LoRA, and the builder's LoRA fused by zcompile.

Builds a random-weight Llama model with Llama-3.2-1B layer shapes (hidden 2048, 32 query / 8
key-value heads, head_dim 64, FFN 8192), ``--layers`` layers (default 2) and a cut vocabulary
(``--vocab``, default 8000: the real 128,256-token LM head is left out so it does not dominate; not
8192, which equals the FFN size and makes the builder take gate_proj for the LM head),
saves it as a Hugging Face folder with a small BPE tokenizer, saves a PEFT LoRA adapter per rank
(r, alpha = 2r, all seven projections, A and B refilled with seeded ``randn * 0.02`` so B != 0),
and gives both to onnxruntime-genai's own model builder
(``python -m onnxruntime_genai.models.builder``), for each precision (``-p fp32`` / ``-p int4``):

- ``base``:         the builder, no adapter;
- ``builder_lora``: the builder with ``--extra_options adapter_path=<PEFT adapter dir>``;
- ``fused_lora``:   ``zcompile compile <builder_lora folder> -o <out> --strategy fuse`` (verification on).

A variant that zcompile cannot compile (or where it finds no adapter site) is recorded as
``not compiled: <message>`` and left out of the timing; the script is rerunnable to fill it in.

Every variant is one ``onnxruntime_genai.Model``; all of them (every precision and rank) are
timed in ONE interleaved run: after warm-up, each round runs one greedy generation per variant,
in an order rotated from round to round. One generation = ``Generator`` creation, a
``--prompt``-token prompt (seeded random token ids) through ``append_tokens`` and the first
``generate_next_token`` (time to first token, TTFT), then ``--new-tokens`` more
``generate_next_token`` calls (decode; tokens/s = new tokens / their time). Greedy tokens are
checked: fused_lora must produce builder_lora's tokens (fp32: exact; int4: agreement reported).

Outputs: a rich table on stdout and a JSON file (``--out``) with the machine, the versions, load
averages before/after, settings and every per-round sample. ``--quick``: tiny shapes, for tests.

    python benchmarks/genai_latency.py                          # defaults above
    python benchmarks/genai_latency.py --precisions fp32 --ranks 16 --rounds 10 --out /tmp/g.json
    python benchmarks/genai_latency.py --quick --out /tmp/quick.json
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the zflora_compile of this checkout (also when run as a worker)

from zflora_compile.latency import interleaved, load_average, machine_info, summarize  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "genai_latency.json"
SCHEMA_VERSION = 1
KINDS = ("base", "builder_lora", "fused_lora")
PRECISIONS = ("fp32", "int4")
GEMM_OPS = ("MatMul", "MatMulNBits", "Gemm", "FusedMatMul")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_STD = 0.02
REAL_VOCAB = 128256
BOS, EOS, PAD = 1, 2, 0

# Llama-3.2-1B layer shapes; the vocabulary is --vocab.
FULL_MODEL = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64, intermediate_size=8192,
                  rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=2048)
FULL = dict(layers=2, vocab=8000, ranks=[8, 32], prompt=128, new_tokens=32, rounds=80, warmup=2)
QUICK_MODEL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                   rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=128)
QUICK = dict(layers=2, vocab=256, ranks=[4], prompt=16, new_tokens=8, rounds=3, warmup=1)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a tiny llama model with a low rank adapter",
    "onnx runtime generate api runs the model on the cpu",
    "lora adds a product of two small matrices to a linear layer",
    "hello world, this is a test of the tokenizer.",
]

_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ versions


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("zflora-compile", "onnxruntime", "onnxruntime-genai", "onnx", "torch", "transformers", "peft", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "zflora_compile"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            out["zflora_compile_dirty"] = bool(dirty.stdout.strip())
            out["zflora_compile_uncommitted_files"] = [line[3:] for line in dirty.stdout.splitlines()]
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# ------------------------------------------------------------------------------ settings


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="onnxruntime-genai generation latency (TTFT, decode tokens/s): base / builder_lora / fused_lora.")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (hidden 64, vocab 256, rank 4, prompt 16, 8 new tokens, 3 rounds) for tests")
    parser.add_argument("--layers", type=int, default=None, help=f"decoder layers (default {FULL['layers']})")
    parser.add_argument("--vocab", type=int, default=None, help=f"vocabulary / LM head rows (default {FULL['vocab']}; the real {REAL_VOCAB} is left out)")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="LoRA ranks, alpha = 2*rank (default 8 32; quick 4)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS), help="builder precisions (default fp32 int4)")
    parser.add_argument("--prompt", type=int, default=None, help=f"prompt tokens (default {FULL['prompt']}; quick {QUICK['prompt']})")
    parser.add_argument("--new-tokens", type=int, default=None, help=f"decode tokens after the first one (default {FULL['new_tokens']}; quick {QUICK['new_tokens']})")
    parser.add_argument("--rounds", type=int, default=None, help=f"interleaved rounds (default {FULL['rounds']}; quick {QUICK['rounds']})")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed generations per variant before the rounds (default {FULL['warmup']})")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra_op_num_threads in every genai_config (default: ONNX Runtime's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="model, adapter and prompt seed (default 0)")
    parser.add_argument("--workdir", type=Path, default=None, help="where models go (default: a temp dir, deleted at the end); keep it out of the repo")
    parser.add_argument("--keep-workdir", action="store_true", help="do not delete the default temp workdir")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default benchmarks/results/genai_latency.json)")
    parser.add_argument("--build-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build_worker is not None:
        return args
    profile = QUICK if args.quick else FULL
    for key, value in profile.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("layers", "prompt", "new_tokens", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or any(r < 1 for r in args.ranks):
        parser.error("--warmup must be >= 0 and every rank >= 1")
    if args.vocab < 16:
        parser.error("--vocab must be >= 16")
    args.ranks = list(dict.fromkeys(args.ranks))
    args.precisions = list(dict.fromkeys(args.precisions))
    args.model = dict(QUICK_MODEL if args.quick else FULL_MODEL)
    args.model.update(num_hidden_layers=args.layers, vocab_size=args.vocab)
    m = args.model
    linear_outs = {m["hidden_size"], m["intermediate_size"], m["num_attention_heads"] * m["head_dim"], m["num_key_value_heads"] * m["head_dim"], *args.ranks}
    if args.vocab in linear_outs:
        # The builder takes the first nn.Linear with out_features == vocab_size for the LM head
        # (builders/base.py has_lm_head): with vocab == FFN size it wires the logits to layer 0's
        # gate_proj input and leaves the rest of the model dead.
        parser.error(f"--vocab {args.vocab} equals a Linear layer's output size {sorted(linear_outs)}: onnxruntime-genai's builder "
                     "would take that layer for the LM head; choose another vocabulary size")
    args.model["max_position_embeddings"] = max(args.model["max_position_embeddings"], args.prompt + args.new_tokens + 8)
    return args


# ------------------------------------------------------------------------------ build (worker process)


def make_tokenizer(max_length: int):
    """A small byte-level BPE tokenizer (<s> = 1, </s> = 2) trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], initial_alphabet=[], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", model_max_length=max_length)
    assert fast.convert_tokens_to_ids("<s>") == BOS and fast.convert_tokens_to_ids("</s>") == EOS
    return fast


def make_sources(plan: dict) -> dict:
    """The HF folder (seeded random Llama + tokenizer) and one PEFT adapter folder per rank."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    seed = plan["seed"]
    hf_dir = Path(plan["hf_dir"])
    torch.manual_seed(seed)
    config = LlamaConfig(**plan["model"], hidden_act="silu", tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(hf_dir, safe_serialization=True)
    make_tokenizer(plan["model"]["max_position_embeddings"]).save_pretrained(hf_dir)
    info = {"hf_dir_mb": round(sum(f.stat().st_size for f in hf_dir.iterdir()) / 1e6, 1), "adapters": {}}
    for rank, adapter_dir in plan["adapters"].items():
        torch.manual_seed(seed)
        lora = LoraConfig(r=int(rank), lora_alpha=2 * int(rank), lora_dropout=0.0, bias="none", target_modules=LORA_TARGETS,
                          task_type="CAUSAL_LM", init_lora_weights=False)
        peft_model = get_peft_model(model, lora)
        generator = torch.Generator().manual_seed(seed + 1000 + int(rank))
        params = 0
        with torch.no_grad():
            for name, p in sorted(peft_model.named_parameters()):
                if ".lora_A." in name or ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * LORA_STD)
                    params += p.numel()
        peft_model.save_pretrained(adapter_dir, safe_serialization=True)
        cfg_path = Path(adapter_dir) / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(hf_dir)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        info["adapters"][rank] = {"parameters": params, "lora_std": LORA_STD}
        model = peft_model.unload()  # the plain model again, for the next rank
        del peft_model
    return info


def build_worker(plan_path: Path) -> int:
    """Make the sources, then run the builder's CLI (runpy, one import) for every build of the plan."""
    import contextlib
    import runpy

    plan = json.loads(plan_path.read_text())
    started = time.perf_counter()
    result = {"sources": make_sources(plan), "sources_s": round(time.perf_counter() - started, 1), "builds": {}}
    for build in plan["builds"]:
        started = time.perf_counter()
        argv = build["argv"]
        with open(build["log"], "w") as logf, contextlib.redirect_stdout(logf), contextlib.redirect_stderr(logf):
            sys.argv = ["builder.py", *argv]
            status = "ok"
            try:
                runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
            except SystemExit as exit_:
                status = "ok" if exit_.code in (None, 0) else f"builder exited with {exit_.code}"
            except Exception as error:  # noqa: BLE001 - recorded, the parent decides
                status = f"{type(error).__name__}: {error}"
        result["builds"][build["name"]] = {"status": status, "build_s": round(time.perf_counter() - started, 1)}
        gc.collect()
        print(f"built {build['name']}: {status} ({result['builds'][build['name']]['build_s']} s)", file=sys.stderr, flush=True)
    Path(plan["result"]).write_text(json.dumps(result, indent=1))
    return 0


def builder_command(args_list: list[str]) -> str:
    return "python -m onnxruntime_genai.models.builder " + " ".join(args_list)


def build_all(args, workdir: Path) -> tuple[dict, dict]:
    """Sources + builder outputs for every precision and rank (one worker process)."""
    hf_dir = workdir / "source" / "hf_llama"
    adapters = {str(r): str(workdir / "source" / f"lora_r{r}") for r in args.ranks}
    builds, folders = [], {}
    for precision in args.precisions:
        for kind, rank in [("base", None)] + [("builder_lora", r) for r in args.ranks]:
            name = f"{precision}_base" if rank is None else f"{precision}_r{rank}_builder_lora"
            out = workdir / name
            shutil.rmtree(out, ignore_errors=True)
            argv = ["-i", str(hf_dir), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(workdir / "cache" / name)]
            if rank is not None:
                argv += ["--extra_options", f"adapter_path={adapters[str(rank)]}"]
            builds.append({"name": name, "argv": argv, "log": str(workdir / f"{name}.builder.log")})
            folders[name] = {"precision": precision, "kind": kind, "rank": rank, "dir": out, "command": builder_command(argv)}
    plan = {"seed": args.seed, "model": args.model, "hf_dir": str(hf_dir), "adapters": adapters, "builds": builds,
            "result": str(workdir / "build_result.json")}
    plan_path = workdir / "build_plan.json"
    plan_path.write_text(json.dumps(plan, indent=1))
    log(f"building sources and {len(builds)} folders with onnxruntime-genai's builder ({', '.join(b['name'] for b in builds)})")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build-worker", str(plan_path)], cwd=workdir)
    if proc.returncode != 0 or not Path(plan["result"]).is_file():
        raise SystemExit(f"the build worker failed (exit {proc.returncode}); logs in {workdir}")
    result = json.loads(Path(plan["result"]).read_text())
    for name, info in folders.items():
        built = result["builds"][name]
        info.update(build_s=built["build_s"], build_status=built["status"])
        if built["status"] != "ok" or not (info["dir"] / "genai_config.json").is_file():
            tail = Path(workdir / f"{name}.builder.log").read_text()[-3000:]
            raise SystemExit(f"builder failed for {name}: {built['status']}\n{tail}")
    return folders, result


def zcompile_fuse(source: Path, out: Path, threads: int | None) -> dict:
    """``zcompile compile <folder> -o <out> --strategy fuse``; the exact message when it does not compile."""
    exe = Path(sys.executable).with_name("zcompile")
    cmd = [str(exe), "compile", str(source), "-o", str(out), "--strategy", "fuse", "--force", "--report", str(out.parent / f"{out.name}.report.json")]
    if threads:
        cmd += ["--threads", str(threads)]
    if not exe.is_file():
        cmd = [sys.executable, "-c", "import sys; from zflora_compile.cli import main; sys.exit(main(sys.argv[1:]))", *cmd[1:]]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    elapsed = round(time.perf_counter() - started, 1)
    report_path = out.parent / f"{out.name}.report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    shown = "zcompile " + " ".join(cmd[1:cmd.index("--force")])
    info = {"command": shown, "exit_code": proc.returncode, "compile_s": elapsed}
    if proc.returncode != 0:
        message = (report or {}).get("message") or (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        info.update(compiled=False, status=f"not compiled: {message}", stderr_tail=proc.stderr[-3000:])
        return info
    sites = report.get("sites") or []
    if not sites:
        message = report.get("message") or "zcompile found no adapter sites"
        info.update(compiled=False, status=f"not compiled: {message}", stderr_tail=proc.stderr[-3000:])
        return info
    verification = report.get("verification") or {}
    info.update(
        compiled=True,
        status="compiled",
        sites=len(sites),
        rejected=len(report.get("rejected") or []),
        unrecognized=len(report.get("unrecognized") or []),
        groups=[{"group": g["group"], "labels": g.get("labels")} for g in report.get("groups") or []],
        report_gemm_count={"input": report["input"].get("gemm_count"), "output": report["output"].get("gemm_count")},
        verification={"passed": verification.get("passed"), "max_abs_diff": (verification.get("worst") or {}).get("max_abs_diff")},
        message=report.get("message"),
    )
    return info


def count_ops(model_path: Path) -> dict:
    """GEMM nodes (MatMul, MatMulNBits, Gemm, FusedMatMul; subgraphs included) and node count of an ONNX file."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    counts = collections.Counter()

    def walk(graph):
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    gemms = {op: counts[op] for op in GEMM_OPS if counts[op]}
    # Nodes of the main graph that no graph output depends on (the builder can leave such when it
    # misreads a model; ONNX Runtime still runs them, a rewritten model would not have them).
    producer = {o: n for n in model.graph.node for o in n.output if o}
    live, stack = set(), [o.name for o in model.graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        stack.extend(i for i in node.input if i)
        for attr in node.attribute:  # outer-scope names a subgraph reads
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                stack.extend(i for n in g.node for i in n.input if i)
    dead = [n.name or n.op_type for n in model.graph.node if id(n) not in live]
    return {"gemm_count": sum(gemms.values()), "gemm_ops": gemms, "nodes": sum(counts.values()), "dead_nodes": dead, "op_counts": dict(sorted(counts.items()))}


def folder_mb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name.startswith("model.onnx")) / 1e6, 1)


# ------------------------------------------------------------------------------ generation


def load_model(folder: Path, threads: int | None):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def generation_runner(model, prompt: np.ndarray, new_tokens: int, samples: list):
    """One greedy generation; appends {ttft_ms, decode_ms, tokens} to ``samples``."""
    import onnxruntime_genai as og

    length = prompt.shape[1] + 1 + new_tokens

    def run():
        start = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=1)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        generator.generate_next_token()
        first = time.perf_counter()
        for _ in range(new_tokens):
            generator.generate_next_token()
        end = time.perf_counter()
        tokens = [int(t) for t in generator.get_sequence(0)][prompt.shape[1]:]
        samples.append({"ttft_ms": (first - start) * 1e3, "decode_ms": (end - first) * 1e3, "tokens": tokens})
        del generator, params

    return run


def prompt_logits(model, prompt: np.ndarray) -> np.ndarray:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=prompt.shape[1] + 1, batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    return np.array(generator.get_output("logits"), dtype=np.float32)


def agreement(a: list[int], b: list[int]) -> dict:
    same = sum(x == y for x, y in zip(a, b))
    first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return {"equal": a == b, "agreeing_positions": same, "positions": min(len(a), len(b)), "agreement": same / max(1, min(len(a), len(b))), "first_difference_at": first_diff}


# ------------------------------------------------------------------------------ main flow


def variant_name(precision: str, kind: str, rank: int | None) -> str:
    return f"{precision}/base" if rank is None else f"{precision}/r{rank}/{kind}"


def prepare_variants(args, workdir: Path) -> tuple[dict, dict, dict]:
    folders, build_result = build_all(args, workdir)
    variants = {}
    for name, info in folders.items():
        vname = variant_name(info["precision"], info["kind"], info["rank"])
        variants[vname] = {
            "precision": info["precision"], "kind": info["kind"], "rank": info["rank"], "dir": str(info["dir"]),
            "source": info["command"], "build_s": info["build_s"], "status": "built",
        }
    for precision in args.precisions:
        for rank in args.ranks:
            source = Path(variants[variant_name(precision, "builder_lora", rank)]["dir"])
            out = workdir / f"{precision}_r{rank}_fused_lora"
            log(f"{precision} r{rank}: zcompile --strategy fuse (verification on)")
            info = zcompile_fuse(source, out, args.threads)
            log(f"{precision} r{rank}: {info['status']} ({info['compile_s']} s)")
            variants[variant_name(precision, "fused_lora", rank)] = {
                "precision": precision, "kind": "fused_lora", "rank": rank, "dir": str(out), "source": info["command"],
                "status": info["status"], "compile": info,
            }
    order = [variant_name(p, k, r) for p in args.precisions for k, r in [("base", None)] + [(k, r) for r in args.ranks for k in KINDS[1:]]]
    variants = {v: variants[v] for v in order}
    for v in variants.values():
        folder = Path(v["dir"])
        if v["status"] in ("built", "compiled"):
            config = json.loads((folder / "genai_config.json").read_text())
            v.update(count_ops(folder / config["model"]["decoder"]["filename"]))
            v["model_file"] = config["model"]["decoder"]["filename"]
            v["model_mb"] = folder_mb(folder)
            if v["dead_nodes"]:
                raise SystemExit(f"{folder}: {len(v['dead_nodes'])} node(s) do not reach any output ({v['dead_nodes'][:6]}...): "
                                 "the timings would include dead work; refusing to benchmark it")
    return variants, build_result, folders


def run(args, workdir: Path) -> dict:
    import onnxruntime_genai as og

    variants, build_result, _ = prepare_variants(args, workdir)
    timed = [v for v, info in variants.items() if info["status"] in ("built", "compiled")]
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(4, args.vocab, size=(1, args.prompt)).astype(np.int32)

    log(f"loading {len(timed)} onnxruntime-genai models")
    models = {v: load_model(Path(variants[v]["dir"]), args.threads) for v in timed}

    # Correctness pass (untimed): prompt logits of every variant.
    logits = {v: prompt_logits(models[v], prompt) for v in timed}

    samples = {v: [] for v in timed}
    runners = {v: generation_runner(models[v], prompt, args.new_tokens, samples[v]) for v in timed}
    log(f"timing: {args.warmup} warm-up generation(s) per variant, then {args.rounds} interleaved rounds of {len(timed)} variants "
        f"(prompt {args.prompt}, 1 + {args.new_tokens} new tokens)")
    done = [0]
    t0 = time.perf_counter()

    def progress():
        done[0] += 1
        if done[0] == 1 or done[0] % 5 == 0 or done[0] == args.rounds:
            per = (time.perf_counter() - t0) / done[0]
            log(f"round {done[0]}/{args.rounds} ({per:.1f} s per round)")

    load_before = load_average()
    total, orders = interleaved(runners, rounds=args.rounds, warmup=args.warmup, progress=progress)
    load_after = load_average()
    warm = args.warmup
    timed_samples = {v: s[warm:] for v, s in samples.items()}
    warmup_samples = {v: s[:warm] for v, s in samples.items()}

    ttft = {v: [s["ttft_ms"] for s in timed_samples[v]] for v in timed}
    decode_per_token = {v: [s["decode_ms"] / args.new_tokens for s in timed_samples[v]] for v in timed}
    results = {}
    for precision in args.precisions:
        group = [v for v in timed if variants[v]["precision"] == precision]
        base = variant_name(precision, "base", None)
        if base not in group:
            continue
        ttft_stats = summarize({v: ttft[v] for v in group}, baseline=base)
        decode_stats = summarize({v: decode_per_token[v] for v in group}, baseline=base)
        for v in group:
            tps = [1e3 / t for t in decode_per_token[v]]
            base_tps = [1e3 / t for t in decode_per_token[base]]
            results[v] = {
                "ttft": ttft_stats[v],
                "decode_ms_per_token": decode_stats[v],
                "decode_tokens_per_s": {
                    "median": statistics.median(tps), "min": min(tps), "max": max(tps),
                    "ratio_to_base": statistics.median(tps) / statistics.median(base_tps),
                    "paired_ratio_to_base_median": statistics.median(a / b for a, b in zip(tps, base_tps)),
                    "samples": [round(x, 3) for x in tps],
                },
                "generation_wall_ms": [round(x, 3) for x in total[v]],
            }

    # fused_lora against builder_lora of the same precision and rank, paired by round.
    for precision in args.precisions:
        for rank in args.ranks:
            builder, fused = variant_name(precision, "builder_lora", rank), variant_name(precision, "fused_lora", rank)
            if builder in results and fused in results:
                results[fused]["vs_builder_lora"] = {
                    "ttft_ratio_of_medians": statistics.median(ttft[fused]) / statistics.median(ttft[builder]),
                    "ttft_paired_ratio_median": statistics.median(f / b for f, b in zip(ttft[fused], ttft[builder])),
                    "decode_tokens_per_s_ratio_of_medians": statistics.median(decode_per_token[builder]) / statistics.median(decode_per_token[fused]),
                    "decode_tokens_per_s_paired_ratio_median": statistics.median(b / f for f, b in zip(decode_per_token[fused], decode_per_token[builder])),
                }

    # Greedy-token checks.
    checks = {}
    for v in timed:
        runs = [s["tokens"] for s in samples[v]]
        variants[v]["tokens"] = runs[0]
        variants[v]["tokens_same_in_every_run"] = all(r == runs[0] for r in runs)
    for precision in args.precisions:
        base = variant_name(precision, "base", None)
        for rank in args.ranks:
            builder = variant_name(precision, "builder_lora", rank)
            fused = variant_name(precision, "fused_lora", rank)
            entry = {"rule": "exact" if precision == "fp32" else "agreement reported"}
            if base in timed and builder in timed:
                entry["adapter_effect"] = {
                    "tokens_base_vs_builder_lora": agreement(variants[base]["tokens"], variants[builder]["tokens"]),
                    "prompt_logits_max_abs_diff": float(np.abs(logits[base] - logits[builder]).max()),
                }
            if fused in timed and builder in timed:
                entry["fused_vs_builder_lora"] = agreement(variants[builder]["tokens"], variants[fused]["tokens"])
                entry["prompt_logits_max_abs_diff"] = float(np.abs(logits[builder] - logits[fused]).max())
                entry["passed"] = entry["fused_vs_builder_lora"]["equal"] if precision == "fp32" else None
            else:
                entry["fused_vs_builder_lora"] = None
                entry["passed"] = None
                entry["note"] = variants[fused]["status"]
            checks[f"{precision}/r{rank}"] = entry
    del models
    gc.collect()
    return {
        "variants": variants,
        "timed_variants": timed,
        "untimed_variants": {v: variants[v]["status"] for v in variants if v not in timed},
        "prompt_token_ids": prompt[0].tolist(),
        "round_orders": orders,
        "warmup_samples": {v: [{k: (round(x, 3) if k != "tokens" else x) for k, x in s.items()} for s in ws] for v, ws in warmup_samples.items()},
        "samples": {v: [{"ttft_ms": round(s["ttft_ms"], 3), "decode_ms": round(s["decode_ms"], 3)} for s in ts] for v, ts in timed_samples.items()},
        "results": results,
        "token_checks": checks,
        "load_average_timing_start": load_before,
        "load_average_timing_end": load_after,
        "build": build_result,
        "onnxruntime_genai": og.__version__ if hasattr(og, "__version__") else None,
    }


# ------------------------------------------------------------------------------ output


def render(results: dict, console) -> None:
    from rich import box
    from rich.table import Table

    s = results["settings"]
    m = results["machine"]
    model = s["model"]
    title = (
        f"onnxruntime-genai {results['versions'].get('onnxruntime-genai')} CPU — {s['layers']}-layer Llama, hidden {model['hidden_size']}, "
        f"{model['num_attention_heads']}/{model['num_key_value_heads']} heads, head_dim {model['head_dim']}, FFN {model['intermediate_size']}, "
        f"vocab {s['vocab']}; prompt {s['prompt']}, 1 + {s['new_tokens']} new tokens, {s['rounds']} interleaved rounds"
    )
    table = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left")
    for name, justify in [
        ("prec", "left"), ("rank", "right"), ("variant", "left"), ("GEMMs", "right"), ("nodes", "right"),
        ("TTFT ms", "right"), ("min-max", "right"), ("x base", "right"), ("paired", "right"),
        ("decode tok/s", "right"), ("min-max", "right"), ("x base", "right"), ("paired", "right"),
        ("vs builder_lora TTFT / tok/s", "right"), ("tokens vs builder", "left"),
    ]:
        table.add_column(name, justify=justify)
    run_ = results["run"]
    variants, res, checks = run_["variants"], run_["results"], run_["token_checks"]
    names = list(variants)
    for index, v in enumerate(names):
        info = variants[v]
        last_of_precision = index == len(names) - 1 or variants[names[index + 1]]["precision"] != info["precision"]
        gemm = "-"
        if "gemm_ops" in info:
            gemm = f"{info['gemm_count']} ({'+'.join(f'{n}{op}' for op, n in info['gemm_ops'].items())})" if len(info["gemm_ops"]) > 1 else str(info["gemm_count"])
        check = ""
        if info["kind"] == "fused_lora":
            c = checks[f"{info['precision']}/r{info['rank']}"]
            if c.get("fused_vs_builder_lora"):
                a = c["fused_vs_builder_lora"]
                check = ("equal" if a["equal"] else f"{a['agreeing_positions']}/{a['positions']} agree") + f" (logits max|d| {c['prompt_logits_max_abs_diff']:.1e})"
        if v not in res:
            table.add_row(info["precision"], str(info["rank"] or ""), info["kind"], gemm, "", info["status"][:60], "", "", "", "", "", "", "", "", "",
                          end_section=last_of_precision)
            continue
        t, d = res[v]["ttft"], res[v]["decode_tokens_per_s"]
        vs = res[v].get("vs_builder_lora")
        vs_text = f"{vs['ttft_paired_ratio_median']:.3f} / {vs['decode_tokens_per_s_paired_ratio_median']:.3f}" if vs else ""
        table.add_row(
            info["precision"], str(info["rank"] or "-"), info["kind"], gemm, str(info["nodes"]),
            f"{t['median_ms']:.1f}", f"{t['min_ms']:.1f}-{t['max_ms']:.1f}", f"{t['ratio_to_base']:.3f}", f"{t['paired_ratio_to_base_median']:.3f}",
            f"{d['median']:.1f}", f"{d['min']:.1f}-{d['max']:.1f}", f"{d['ratio_to_base']:.3f}", f"{d['paired_ratio_to_base_median']:.3f}",
            vs_text, check, style="bold" if info["kind"] == "fused_lora" else None, end_section=last_of_precision,
        )
    console.print(table)
    for line in results["notes"]:
        console.print(f"- {line}", highlight=False)
    console.print(
        f"- machine: {m['cpu_model']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB; load average {m['load_average_start']} "
        f"at start, {run_['load_average_timing_start']} before timing, {run_['load_average_timing_end']} after timing, {m.get('load_average_end')} at end",
        highlight=False,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.build_worker is not None:
        return build_worker(args.build_worker)
    from rich.console import Console

    console = Console(width=max(Console().width, 200))
    temp_workdir = args.workdir is None
    if temp_workdir:
        args.workdir = Path(tempfile.mkdtemp(prefix="zflora-genai-latency-"))
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.workdir == REPO or REPO in args.workdir.parents:
        log(f"warning: --workdir {args.workdir} is inside the repository; models are large, keep them out of it")
    started_wall = dt.datetime.now(dt.timezone.utc)
    started = time.perf_counter()
    machine = machine_info()
    log(f"workdir {args.workdir}; machine {machine['cpu_model']}, {machine['logical_cores']} cores, load {machine['load_average_start']}")
    try:
        run_ = run(args, args.workdir)
    finally:
        if temp_workdir and not args.keep_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)
    machine["load_average_end"] = load_average()
    vocab_note = (
        f"QUICK mode: tiny test shapes (hidden {args.model['hidden_size']}, vocab {args.vocab}), not Llama-3.2-1B; the timings only show that the pipeline runs."
        if args.quick else
        f"The LM head has {args.vocab} rows: the real Llama-3.2-1B vocabulary ({REAL_VOCAB} tokens) is cut so the LM head does not dominate; "
        f"the {args.layers} layers have Llama-3.2-1B shapes and random (seeded) weights."
    )
    notes = [
        "ONE interleaved run: each round runs one generation of every variant (all precisions and ranks), the order rotated per round; "
        "ratios are to the base of the same precision; 'paired' = median over rounds of (variant / base in the same round).",
        vocab_note,
        f"TTFT: GeneratorParams + Generator creation, append_tokens of the {args.prompt}-token prompt and the first generate_next_token; "
        f"decode: the next {args.new_tokens} generate_next_token calls (one model run each), tok/s = {args.new_tokens} / their time. "
        "'x base' for TTFT is a time ratio (> 1 slower); for decode it is a tokens/s ratio (< 1 slower). "
        "'vs builder_lora': fused_lora's paired (same-round) TTFT time ratio / decode tokens/s ratio to builder_lora of the same precision and rank.",
        "GEMMs: MatMul + MatMulNBits (+ Gemm/FusedMatMul) nodes counted in each variant's ONNX file, LM head included; attention is "
        "GroupQueryAttention (no MatMul).",
        "fused_lora = zcompile --strategy fuse of the builder_lora folder (verification on); tokens check: fp32 must be exact, int4 agreement is reported.",
    ]
    for v, status in run_["untimed_variants"].items():
        notes.append(f"{v}: {status} (not timed)")
    results = {
        "benchmark": "genai_latency",
        "schema_version": SCHEMA_VERSION,
        "created_utc": started_wall.isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv] if argv is None else ["genai_latency.py", *argv],
        "wall_time_s": round(time.perf_counter() - started, 1),
        "notes": notes,
        "machine": machine,
        "versions": versions(),
        "settings": {
            "quick": args.quick,
            "arch": "llama",
            "shapes_of": "tiny test config" if args.quick else "Llama-3.2-1B (layer shapes only)",
            "layers": args.layers,
            "vocab": args.vocab,
            "real_vocab_left_out": None if args.quick else REAL_VOCAB,
            "model": args.model,
            "precisions": args.precisions,
            "ranks": args.ranks,
            "alpha": "2 * rank",
            "lora_targets": LORA_TARGETS,
            "lora_init": f"A and B refilled with randn * {LORA_STD} (seeded)",
            "prompt": args.prompt,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "warmup_generations_per_variant": args.warmup,
            "threads": args.threads or "onnxruntime default",
            "seed": args.seed,
            "timer": "time.perf_counter; Python GC disabled during rounds",
            "workdir": str(args.workdir) + (" (temporary, deleted)" if temp_workdir and not args.keep_workdir else ""),
        },
        "run": run_,
    }
    for info in results["run"]["variants"].values():
        info["dir"] = os.path.relpath(info["dir"], args.workdir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    render(results, console)
    console.print(f"- wall time {results['wall_time_s']} s; results written to {args.out}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
