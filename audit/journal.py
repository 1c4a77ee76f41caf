"""The audit's journal: one JSON record per finished batch with its fingerprint and digest, so that
``--resume`` never redoes a batch and never mixes in one of another run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from underfire.audit.config import AuditConfig, AuditError, Target, journal_folder
from underfire.audit.deployment import Deployment

log = logging.getLogger(__name__)





def _sha(tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def journal_settings(cfg: AuditConfig, t: Target) -> dict:
    """The settings that shape a target's per-sample records (not: name, device, batch size, compile,
    channels-last, bootstrap — they change speed, cutting or aggregation, and are checked elsewhere)."""
    return {"seed": cfg.seed, "fpr": cfg.fpr, "examples": cfg.examples, "precision": cfg.precision,
            **{f"targets.{k}": v for k, v in asdict(t).items()}}


def fingerprint(cfg: AuditConfig, t: Target, dep: Deployment) -> dict:
    """What every journal batch of a target must have been made with: the weights of the model and of every
    interpreter (RTS's saliency net), the audited inputs with their classes and targets, the benign images the
    detectors are calibrated and held out on (every kind of data: a folder's may change between runs), the
    settings."""
    mods = {id(m): m for it in dep.interpreters.values() for m in it.modules()}
    mods.setdefault(id(dep.model), dep.model)
    weights = [v for m in mods.values() for _, v in sorted(m.state_dict().items())]
    benign = [c.float() for c in (dep.x_cal, dep.x_heldout) if c is not None]
    return {"model": _sha(weights), "data": _sha([dep.x.float(), dep.y, dep.y_t]),
            "calibration": _sha(benign), "config": journal_settings(cfg, t)}


def config_diff(old: dict, new: dict) -> list[str]:
    """'key: old → new' for each differing key of two flat settings dicts."""
    return [f"{k}: {old.get(k, '(unset)')!r} → {new.get(k, '(unset)')!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def digest(rec: dict) -> str:
    """A batch's content digest (SHA-256 of its canonical JSON, the digest itself left out)."""
    body = json.dumps({k: v for k, v in rec.items() if k != "digest"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def key_paths(rec, prefix: str = "") -> set[str]:
    """The dict-key paths of a (nested) record: two batches of one run have the same."""
    if not isinstance(rec, dict):
        return set()
    return {p for k, v in rec.items() for p in {f"{prefix}/{k}", *key_paths(v, f"{prefix}/{k}")}}


class Journal:
    """Per-batch JSON files under run_dir/journal/<target>/; written atomically, read back on resume.

    Each batch carries the target's :func:`fingerprint`, the sample indices it covers and a digest of its own
    content; ``load`` refuses a batch made with other weights, data or settings, or one moved from another
    batch's place, and redoes one whose content no longer matches its digest (edited or damaged since it was
    written: ``redone`` lists them, and the report says so)."""

    def __init__(self, run_dir: Path, target_key: str, fingerprint: dict | None = None) -> None:
        self.dir = run_dir / "journal" / journal_folder(target_key)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.redone: list[int] = []

    def path(self, i: int) -> Path:
        return self.dir / f"batch_{i:05d}.json"

    def load(self, i: int, index: list[int] | None = None) -> dict | None:
        """Batch ``i`` (without its fingerprint and digest), None when absent, half-written or failing its digest
        (then it is redone); AuditError when it is not this run's batch ``i`` covering samples ``index``."""
        p = self.path(i)
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("journal %s is unreadable (killed mid-write?); redoing that batch", p)
            return None
        if not isinstance(rec, dict):
            raise AuditError(f"journal {p} is not a journal batch (a JSON {type(rec).__name__}); start the run again "
                             f"with --overwrite (or another --name)")
        if self.fingerprint is not None and rec.get("digest") != digest(rec):
            if "digest" not in rec:
                raise AuditError(f"journal {p} carries no digest (written by an older underfire): it cannot be "
                                 f"checked; start the run again with --overwrite (or another --name)")
            log.warning("journal %s does not match its digest (edited or damaged); redoing that batch", p)
            if i not in self.redone:
                self.redone.append(i)
            return None
        rec.pop("digest", None)
        got = rec.pop("fingerprint", None)
        if self.fingerprint is not None:
            self._verify(p, got, rec.get("index"), index)
        return rec

    def _verify(self, p: Path, got: dict | None, have: list | None, want: list[int] | None) -> None:
        again = "start the run again with --overwrite (or another --name)"
        if not isinstance(got, dict) or set(got) != set(self.fingerprint):
            raise AuditError(f"journal {p} carries no fingerprint of this version (written by an older underfire, or "
                             f"not a journal batch): it cannot be checked against this run; {again}")
        if want is not None and have != want:
            span = f"{have[0]}–{have[-1]}" if isinstance(have, list) and have else repr(have)
            raise AuditError(f"journal {p} covers samples {span}, but batch {p.stem} is samples {want[0]}–{want[-1]}: "
                             f"the file was moved or copied; {again}")
        fp = self.fingerprint
        if got["model"] != fp["model"]:
            raise AuditError(f"journal {p} was made with other weights (model fingerprint {got['model']} ≠ "
                             f"{fp['model']}): the model or interpreter files changed since the run started; {again}")
        if got["config"] != fp["config"]:
            raise AuditError(f"journal {p} was made with other settings ({'; '.join(config_diff(got['config'], fp['config']))}); "
                             f"resume with the same settings, or {again}")
        for part, what in (("data", "audit data"), ("calibration", "calibration / held-out images")):
            if got[part] != fp[part]:
                raise AuditError(f"journal {p} was made on other {what} ({part} fingerprint {got[part]} ≠ {fp[part]}): "
                                 f"the data changed since the run started; {again}")

    def save(self, i: int, rec: dict) -> None:
        tmp = self.path(i).with_suffix(".tmp")
        rec = rec if self.fingerprint is None else {**rec, "fingerprint": self.fingerprint}
        tmp.write_text(json.dumps({**rec, "digest": digest(rec)} if self.fingerprint is not None else rec))
        os.replace(tmp, self.path(i))
