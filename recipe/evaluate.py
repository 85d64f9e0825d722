"""Score an ESM-2 model on a protein file: masked-LM loss, perplexity and accuracy.

    python -m recipe.evaluate MODEL DATA [--masking esm|all-mask] [--max-length 1024] [--limit N] [--json]

MODEL is an exported or Hugging Face ESM-2 directory (config.json + model.safetensors or pytorch_model.bin, e.g.
facebook/esm2_t33_650M_UR50D saved on disk) or one of our checkpoints (OUTPUT_DIR/checkpoints/step_N; a checkpoints
directory means its newest complete one). DATA is anything dataset.train_path takes. Batches are built and packed
as validation batches are in training (recipe.data.dataset.MLMBatches: sequences in file order, cropped from their
start to --max-length tokens, masks keyed by --seed and the sequence's row), and scored by the trainer's own
`evaluate`, so the numbers are comparable with a run's val_loss for the same masking and seed.

Masking protocols: `esm` selects 15 % of residues, 80 % become <mask>, 10 % a random residue, 10 % stay (how ESM-2 was
trained); `all-mask` replaces every selected residue by <mask> (the protocol of Synthyra/SpeedrunningPLMs' published
ESM-2 tables). Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recipe.checkpoint import complete_checkpoints, load_model_weights
from recipe.data.dataset import BatchSettings, MLMBatches
from recipe.data.sources import SequenceStore, load_sequences
from recipe.model import EsmConfig, build_model
from recipe.model.convert import config_from_hf, load_hf_into

# --masking: (share of selected tokens replaced by <mask>, share replaced by a random residue)
MASKING = {"esm": (0.8, 0.1), "all-mask": (1.0, 0.0)}
MASK_PROB = 0.15
PAD_MULTIPLE = 16  # packed batches are padded as BF16 training pads them (dataset.pad_to_multiple_of=auto, no FP8)


class InputError(Exception):
    """Bad input: the message (one line) names the path or option."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: EsmConfig
    description: str


# ====================================================================================== model
def load_model(path: Path, device: torch.device, backend: str = "auto") -> LoadedModel:
    """An exported / Hugging Face directory or a checkpoint, built on `device` with its weights loaded."""
    if not path.exists():
        raise InputError(f"{path}: no such model directory")
    if not path.is_dir():
        raise InputError(f"{path}: not a directory (MODEL is an exported ESM-2 directory or a checkpoints/step_N directory)")
    if not (path / "meta.json").exists() and not (path / "config.json").exists():
        found = complete_checkpoints(path) or complete_checkpoints(path / "checkpoints")
        if not found:
            raise InputError(f"{path}: neither a Hugging Face ESM-2 directory (no config.json) nor a checkpoint (no meta.json)")
        path = found[-1][1]
    try:
        if (path / "meta.json").exists():
            return _load_checkpoint(path, device, backend)
        config = config_from_hf(path, backend=backend)
        model = build_model(config, device=device, seed=None)
        load_hf_into(model, path)
        return LoadedModel(model, model.config, f"{path} (Hugging Face format)")
    except InputError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot load an ESM-2 model: {_one_line(exc)}") from exc


def _load_checkpoint(path: Path, device: torch.device, backend: str) -> LoadedModel:
    meta = json.loads((path / "meta.json").read_text())
    if "model_shape" not in meta or "config" not in meta:
        raise InputError(f"{path}/meta.json: not one of our checkpoints (no model_shape/config)")
    if "model_config" in meta:  # the resolved model, as the trainer built it
        fields = dict(meta["model_config"])
    else:  # older checkpoints: the shape and the model keys that were given
        m = meta["config"]["model"]
        own = ("activation", "layer_norm_eps", "token_dropout", "fp32_residual")
        fields = {**meta["model_shape"], **{k: m[k] for k in own if m.get(k) is not None}, "backend": m["backend"]}
    # hf checkpoints hold transformers' parameter names; torch and te ones load into either of ours
    config = EsmConfig(**{**fields, "backend": "hf" if fields["backend"] == "hf" else backend})
    model = build_model(config, device=device, seed=None)
    load_model_weights(path, model)
    return LoadedModel(model, model.config, f"{path} (checkpoint, step {meta['step']})")


def _one_line(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split())


# ====================================================================================== data
def head(store: SequenceStore, n: int) -> SequenceStore:
    """The first `n` sequences of `store`."""
    n = min(n, len(store))
    return SequenceStore(store.tokens[: store.offsets[n]], store.offsets[: n + 1].copy(), source=store.source)


def batch_settings(masking: str, max_length: int, batch_tokens: int, seed: int, layout: str = "thd") -> BatchSettings:
    """Validation-style batches for one masking protocol: thd packs up to `batch_tokens` tokens; bshd (the hf
    backend) pads batch_tokens // max_length sequences."""
    if max_length < 3:
        raise InputError(f"--max-length={max_length} leaves no room for a residue (it counts <cls> and <eos>)")
    if batch_tokens < max_length or batch_tokens % PAD_MULTIPLE:
        raise InputError(
            f"--batch-tokens={batch_tokens} must be a multiple of {PAD_MULTIPLE} and at least --max-length={max_length}"
        )
    mask_frac, random_frac = MASKING[masking]
    return BatchSettings(
        max_seq_length=max_length,
        layout=layout,
        token_micro_batch_size=batch_tokens,
        micro_batch_size=max(1, batch_tokens // max_length),
        pad_to_multiple_of=PAD_MULTIPLE,
        mask_prob=MASK_PROB,
        seed=seed,
        mask_token_frac=mask_frac,
        random_token_frac=random_frac,
    )


def eval_batches(store: SequenceStore, settings: BatchSettings) -> MLMBatches:
    """One deterministic pass over `store` (what the trainer's validation reads)."""
    return MLMBatches(store, settings, train=False)


class Progress:
    """Batches passed through, counting sequences on a tqdm bar (stderr)."""

    def __init__(self, batches, total: int, enabled: bool = True):
        from tqdm import tqdm

        self.batches, self.sequences = batches, 0
        self.bar = tqdm(total=total, unit="seq", desc="evaluate", file=sys.stderr, disable=not enabled, dynamic_ncols=True)

    def __iter__(self):
        for batch in self.batches:
            n = len(batch["seq_lengths"])
            self.sequences += n
            self.bar.update(n)
            yield batch
        self.bar.close()


# ====================================================================================== run
def resolve_device(pref: str) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is visible")
    return torch.device("cuda" if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()) else "cpu")


def score(args: argparse.Namespace) -> dict:
    from recipe.validation import evaluate

    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    loaded = load_model(Path(args.model), device, args.backend)
    try:
        store = load_sequences(args.data, args.format, args.column, split=args.split)
    except (OSError, ValueError) as exc:
        raise InputError(_one_line(exc)) from exc
    total = len(store)
    if args.limit is not None:
        store = head(store, args.limit)
    layout = "bshd" if loaded.config.backend == "hf" else "thd"
    settings = batch_settings(args.masking, args.max_length, args.batch_tokens, args.seed, layout)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    progress = Progress(eval_batches(store, settings), len(store), enabled=not args.no_progress)
    try:
        result = evaluate(loaded.model, progress, device, amp, max_batches=None)
    except RuntimeError as exc:
        if "no masked tokens" in str(exc):
            raise InputError(f"{args.data}: the masking selected no residue to score (too few residues)") from exc
        raise
    loss = result["val_loss"]
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        "accuracy": result["val_accuracy"],
        "tokens": result["val_tokens"],
        "sequences": progress.sequences,
        "residues": int(np.minimum(store.lengths, args.max_length - 2).sum()),
        "model": loaded.description,
        "backend": loaded.config.backend,
        "data": f"{args.data} ({len(store):,} of {total:,} sequences)",
        "masking": args.masking,
        "seed": args.seed,
        "max_length": args.max_length,
        "device": f"{device.type} {'bf16' if bf16 else 'fp32'}",
    }


def report(r: dict) -> str:
    mask_frac, random_frac = MASKING[r["masking"]]
    protocol = (
        f"{r['masking']}: {MASK_PROB:.0%} of residues selected; {mask_frac:.0%} <mask>, {random_frac:.0%} random, "
        f"{1 - mask_frac - random_frac:.0%} kept; seed {r['seed']}"
    )
    rows = [
        ("model", f"{r['model']}, backend {r['backend']}, {r['device']}"),
        ("data", f"{r['data']}, up to {r['max_length']} tokens each"),
        ("masking", protocol),
        ("loss", f"{r['loss']:.4f}"),
        ("perplexity", f"{r['perplexity']:.3f}"),
        ("accuracy", f"{r['accuracy']:.4f}"),
        ("tokens", f"{r['tokens']:,} masked tokens scored ({r['residues']:,} residues)"),
        ("sequences", f"{r['sequences']:,}"),
    ]
    return "\n".join(f"{k:<11}{v}" for k, v in rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m recipe.evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("model", help="exported / Hugging Face ESM-2 directory, or a checkpoint (checkpoints/step_N)")
    p.add_argument("data", help="FASTA (.gz/.xz), parquet file or directory, CSV, or a datasets directory")
    p.add_argument("--masking", choices=sorted(MASKING), default="esm", help="esm (80/10/10, default) or all-mask")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per sequence incl. <cls>/<eos>; longer ones are cropped")
    p.add_argument("--batch-tokens", type=int, default=16384, help="tokens per packed batch (a multiple of 16)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N sequences")
    p.add_argument("--seed", type=int, default=0, help="masking seed: the same seed gives the same masks and numbers")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda if present")
    p.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 autocast on cuda, fp32 on cpu"
    )
    p.add_argument("--backend", choices=("auto", "torch", "te"), default="auto", help="our layer implementation to run it with")
    p.add_argument("--format", default="auto", help="data format: auto, fasta, parquet, csv, hf")
    p.add_argument("--column", default="sequence", help="column that holds sequences (parquet, csv, hf)")
    p.add_argument("--split", default="train", help="split of a datasets directory")
    p.add_argument(
        "--json", action="store_true", help="end stdout with one JSON object (loss, perplexity, accuracy, tokens, sequences)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        p.error(f"--limit={args.limit} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = score(args)
    except InputError as exc:
        print(f"recipe.evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(report(result), flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
