"""Run checkpoints: written atomically, verified on load, the newest k kept.

A checkpoint is a directory `run_dir/checkpoints/step-<global step>` holding whatever the
controller puts in it (the model in HF format, the optimizer state, `state.json` with the
curriculum, data position, random states and step counters, the resolved recipe) plus
`MANIFEST.json`, written last, with every file's size and SHA-256. It is built under a temporary name, flushed and
renamed, so a crash leaves either a whole checkpoint or a temporary directory that is never
read. `latest` walks the checkpoints newest first and skips (and reports) any whose files
do not match its manifest: a truncated or corrupt checkpoint is never resumed from.
`resumable_state` refuses, naming why, a checkpoint that the recipe cannot continue from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from zaya_rl.recipe import Recipe

MANIFEST = "MANIFEST.json"
PREFIX = "step-"
RECIPE = "recipe.resolved.yaml"  # the recipe that wrote the checkpoint, as `zaya-rl show` prints it
STATE_KEYS = ("position", "data", "curriculum", "summary", "metrics_records", "random")
# peft's file of an adapter directory: the model of a LoRA run's checkpoint (Learner.save_checkpoint_model)
ADAPTER_CONFIG = "adapter_config.json"


class ResumeError(RuntimeError):
    """A checkpoint the recipe cannot continue from; the message names it and says why."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def write(run_dir: Path, global_step: int, fill: Callable[[Path], None], keep_last: int) -> Path:
    """Create checkpoint `global_step`: `fill(tmp)` writes its files; then manifest, fsync, rename."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{global_step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    fill(tmp)
    manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"step": global_step, "files": manifest}, indent=1))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in complete(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(run_dir: Path) -> list[Path]:
    """Checkpoint directories that have a manifest, oldest first (not yet verified)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / MANIFEST).is_file())


def verify(path: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"unreadable manifest: {err}"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != meta["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, manifest says {meta['bytes']}"
        if _sha256(f) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest(run_dir: Path, report: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for path in reversed(complete(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        report(f"skipping checkpoint {path}: {problem}")
    return None


def base_model_path(path: Path) -> Path:
    """The model directory workers start from: `path`, or for a LoRA adapter directory the base
    model it adapts (the learner takes the adapters from the checkpoint's DeepSpeed state)."""
    config = Path(path) / ADAPTER_CONFIG
    return Path(json.loads(config.read_text())["base_model_name_or_path"]) if config.is_file() else Path(path)


def resumable_state(path: Path, recipe: Recipe) -> dict:
    """The checkpoint's `state.json`, once it is clear that `recipe` can continue from it: the
    stages the run had finished or was in are the recipe's first stages (by name), and every
    source whose data position it holds is still in the recipe. Settings may differ (a new lr,
    `--set`), and so may the stages still to come."""
    state = json.loads((path / "state.json").read_text())
    # A LoRA checkpoint's model is adapters alone; the stage checkpoints (RUN_DIR/stages/NAME) are whole.
    weights = "RUN_DIR/stages/NAME" if (path / "model" / ADAPTER_CONFIG).is_file() else path / "model"
    restart = f"start a stage anew with --stage NAME --from {weights}"
    if missing := [key for key in STATE_KEYS if key not in state]:
        raise ResumeError(f"{path}: state.json lacks {missing} (an older zaya-rl wrote it): {restart}")
    position = state["position"]
    # the stages it finished, and the one it was in
    reached = position["stage_index"] + (1 if position.get("step", 0) > 0 else 0)
    names = [stage.name for stage in recipe.stages]
    if (path / RECIPE).is_file():
        written = yaml.safe_load((path / RECIPE).read_text())
        written_by = [stage["name"] for stage in written["stages"]]
        if written_by[:reached] != names[:reached]:
            raise ResumeError(f"{path}: written after stages {written_by[:reached]} of {written_by}; the recipe "
                              f"{recipe.name!r} has stages {names}: resume with the recipe that wrote it, or {restart}")
        # LoRA checkpoints hold adapters of one shape and their optimizer state; full ones every weight's.
        written_lora = written.get("deepspeed", {}).get("lora")
        lora = recipe.deepspeed.lora.model_dump(mode="json") if recipe.deepspeed.lora else None
        if written_lora != lora:
            raise ResumeError(f"{path}: written with deepspeed.lora {written_lora}; the recipe {recipe.name!r} has "
                              f"{lora}: resume with the LoRA settings it trained with")
    elif reached > len(names):
        raise ResumeError(f"{path}: written after {reached} stages, but the recipe {recipe.name!r} has "
                          f"{len(names)}: {restart}")
    sources = {source.name for stage in recipe.stages for source in recipe.data_for(stage).sources}
    if unknown := sorted(set(state["data"]) - sources):
        raise ResumeError(f"{path}: holds the data position of sources {unknown}, which the recipe "
                          f"{recipe.name!r} does not have (its sources: {sorted(sources)}): {restart}")
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
