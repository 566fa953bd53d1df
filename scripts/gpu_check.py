"""The training part of ``scripts/gpu-check.sh``, and the merge of its results into ``benchmarks/results``.

``python scripts/gpu_check.py train-check OUT [--device cuda|cpu] [--tiny]``: the embedded default student
(``configs/default.toml``'s ``[model]``, SmolLM2's tokenizer from the bundled GGUF) trained at TP=1 through
the real ``python -m student.train`` on the Python standard library's source with a synthetic teacher top-20
(the actual next token first at probability 0.5, mass 0.9), in three legs that hand checkpoints across the
two optimizer paths of ``student.optim``:

- A: ``--device`` (CUDA: bf16 parameters, megatron-core DDP + distributed optimizer), ``steps`` steps, a
  checkpoint halfway;
- B: resumes A's halfway checkpoint on the CPU (``CUDA_VISIBLE_DEVICES=""``: float32, torch AdamW) for a few
  steps and checkpoints;
- C: resumes B's checkpoint on ``--device`` to the end (not with ``--device cpu``: B covered that path).

Checks (exit 1 when one fails): every leg ends well on the device it should; A's loss falls; B's and C's
training losses equal A's at the same steps within ``tolerance`` (bf16 vs float32 on GPU; on a CPU-only dry run
every leg runs the same float32 path and must agree to 1e-6). Writes ``OUT/train_check.json``.

``python scripts/gpu_check.py merge SRC DEST KEY``: ``DEST[KEY] = SRC`` (JSON files), keeping DEST's other keys.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

K = 20
SIZES = {  # steps of A, halfway checkpoint, B's last step; tokens per step = micro x seq
    "full": {"steps": 40, "half": 20, "b_end": 24, "seq": 256, "micro": 4, "files": 120, "timeout": 240},
    "tiny": {"steps": 4, "half": 2, "b_end": 3, "seq": 64, "micro": 2, "files": 12, "timeout": 240},
}


def tokenizer_file(out: Path) -> Path:
    """SmolLM2's tokenizer (the embedded default's students share it), read from the bundled GGUF."""
    from gguf import GGUFReader

    from student.gguf_import import _metadata, bundled_smollm2_gguf, tokenizer_from_metadata

    path = out / "tokenizer.json"
    if not path.is_file():
        gguf = bundled_smollm2_gguf()
        tokenizer_from_metadata(_metadata(GGUFReader(gguf)), gguf).save(str(path))
    return path


def corpus(files: list[Path], tokenizer: Any, vocab: int, seed: int) -> Any:
    """Token documents of ``files`` with a synthetic teacher top-k at every position (distinct ids)."""
    from student.batches import TokenCorpus

    docs = [tokenizer.encode(f.read_text(encoding="utf-8", errors="replace")) for f in files]
    data = TokenCorpus.from_documents([d for d in docs if len(d) > 1])
    rng = np.random.default_rng(seed)
    n, stride = len(data.tokens), vocab // K
    shift = rng.integers(1, stride, size=(n, 1))
    offsets = np.arange(K) * stride + np.where(np.arange(K) > 0, shift, 0)
    data.topk_ids = ((data.tokens[:, None].astype(np.int64) + offsets) % vocab).astype(np.int32)
    rest = np.sort(rng.dirichlet(np.full(K - 1, 0.3), size=n), axis=1)[:, ::-1] * 0.4
    weights = np.concatenate([np.full((n, 1), 0.5), rest], axis=1)
    data.topk_logprobs = np.log(np.maximum(weights, 1e-30)).astype(np.float32)
    return data


def prepare(out: Path, size: dict[str, Any]) -> tuple[Path, Path, Path]:
    from student.tokenizer import StudentTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok_path = tokenizer_file(out)
    tokenizer = StudentTokenizer.load(tok_path)
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[: size["files"] + 4]
    train = corpus(sources[4:], tokenizer, tokenizer.vocab_size, seed=0).save(out / "train.npz")
    val = corpus(sources[:4], tokenizer, tokenizer.vocab_size, seed=1).save(out / "val.npz")
    return tok_path, train, val


def write_spec(
    path: Path, data: tuple[Path, Path, Path], out: Path, size: dict[str, Any], resume: Path | None, cpu: bool
) -> Path:
    model = tomllib.loads((ROOT / "configs" / "default.toml").read_text())["model"]
    model["seq_length"] = size["seq"]
    spec = {
        "model": model,
        "train": {
            "tensor_parallel": 1,
            "data_parallel": 1,
            "micro_batch_size": size["micro"],
            "steps": size["steps"],
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 1,
            "eval_every": size["steps"],
            "eval_batches": 2,
            "checkpoint_every": size["half"],
            "keep_checkpoints": 10,
            "threads_per_rank": min(8, os.cpu_count() or 1) if cpu else 1,
        },
        "loss": {"kind": "soft", "tail": "tail_bucket"},
        "tokenizer": str(data[0]),
        "train_data": str(data[1]),
        "val_data": str(data[2]),
        "out_dir": str(out),
        "resume": str(resume) if resume else False,
    }
    path.write_text(json.dumps(spec, indent=2))
    return path


def run_leg(name: str, spec: Path, cpu_only: bool, timeout: float) -> dict[str, Any]:
    """``python -m student.train SPEC`` (a world of one); returns its summary and per-step train losses."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "student.train", str(spec)]
    print(f"  leg {name}: {' '.join(cmd)}{' (CUDA hidden)' if cpu_only else ''}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = Path(json.loads(spec.read_text())["out_dir"])
    (out.parent / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"leg {name} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    summary = json.loads((out / "train_summary.json").read_text())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    losses = {r["step"]: r["loss"] for r in lines if r["split"] == "train"}
    return {"summary": summary, "losses": losses, "wall_s": time.perf_counter() - started}


def max_rel_diff(ours: dict[int, float], ref: dict[int, float], steps: range) -> float:
    return max(abs(ours[s] - ref[s]) / abs(ref[s]) for s in steps)


def train_check(out: Path, device: str, tiny: bool) -> dict[str, Any]:
    import torch

    size = SIZES["tiny" if tiny else "full"]
    cross = device == "cuda"
    if cross and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    tolerance = 0.03 if cross else 1e-6
    data = prepare(out, size)
    timeout = size["timeout"]
    a = run_leg("A", write_spec(out / "A.json", data, out / "A", size, None, not cross), not cross, timeout)
    b_size = dict(size, steps=size["b_end"])
    half = out / "A" / "checkpoints" / f"step_{size['half']:06d}"
    b = run_leg("B", write_spec(out / "B.json", data, out / "B", b_size, half, True), True, timeout)
    legs = {"A": a, "B": b}
    if cross:
        handed = out / "B" / "checkpoints" / f"step_{size['b_end']:06d}"
        legs["C"] = run_leg(
            "C", write_spec(out / "C.json", data, out / "C", size, handed, False), False, timeout
        )
    first, last = a["losses"][1], a["losses"][size["steps"]]
    b_steps, c_steps = range(size["half"] + 1, size["b_end"] + 1), range(size["b_end"] + 1, size["steps"] + 1)
    result = {
        "device": torch.cuda.get_device_name() if cross else "cpu (dry run)",
        "model": "configs/default.toml [model], SmolLM2 tokenizer (vocab 49152), TP=1",
        "tokens_per_step": size["seq"] * size["micro"],
        "steps": size["steps"],
        "precision": {leg: r["summary"]["precision"] for leg, r in legs.items()},
        "devices": {leg: r["summary"]["device"] for leg, r in legs.items()},
        "tokens_per_s": a["summary"]["tokens_per_s"],
        "loss_first": first,
        "loss_last": last,
        "resume_on_cpu_max_rel_diff": max_rel_diff(b["losses"], a["losses"], b_steps),
        "tolerance": tolerance,
        "wall_s": {leg: round(r["wall_s"], 1) for leg, r in legs.items()},
    }
    if "C" in legs:
        result["resume_back_max_rel_diff"] = max_rel_diff(legs["C"]["losses"], a["losses"], c_steps)
    expected = {"A": device, "B": "cpu", "C": device}
    failures = [
        f"leg {leg} ran on {result['devices'][leg]}, expected {expected[leg]}"
        for leg in legs
        if result["devices"][leg] != expected[leg]
    ]
    if cross and result["precision"]["A"] != "bf16":
        failures.append(f"leg A trained in {result['precision']['A']}, expected bf16 (the default on CUDA)")
    if not tiny and not last < 0.9 * first:
        failures.append(f"the loss did not fall: step 1 {first:.4f}, step {size['steps']} {last:.4f}")
    for key in ("resume_on_cpu_max_rel_diff", "resume_back_max_rel_diff"):
        if key in result and not result[key] <= tolerance:
            failures.append(f"{key} = {result[key]:.3g} > {tolerance}")
    result["failures"] = failures
    (out / "train_check.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def merge(src: Path, dest: Path, key: str) -> None:
    data = json.loads(dest.read_text()) if dest.is_file() else {}
    data[key] = json.loads(src.read_text())
    tmp = dest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(dest)
    print(f"  {dest}: [{key!r}] <- {src}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("train-check", help="the three training legs and their checks")
    check.add_argument("out", type=Path)
    check.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    check.add_argument("--tiny", action="store_true", help="sequence 64, 4 steps (the CPU dry run)")
    combine = sub.add_parser("merge", help="DEST[KEY] = SRC")
    combine.add_argument("src", type=Path)
    combine.add_argument("dest", type=Path)
    combine.add_argument("key")
    args = parser.parse_args(argv)
    if args.command == "merge":
        merge(args.src, args.dest, args.key)
        return 0
    result = train_check(args.out, args.device, args.tiny)
    print(json.dumps(result, indent=2))
    for failure in result["failures"]:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
