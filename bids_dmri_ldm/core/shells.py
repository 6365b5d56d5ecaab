"""Shells of a gradient table and what happens to each volume of a run (numpy, no BIDS).

Every volume of the input has a fate:

* a **b0** (``b <= B0_THRESHOLD``) is carried into the output (resampled to its grid) and takes
  part in S0 (the mean b0);
* a volume of a **fitted shell** (enough directions for the SH order) is SH-fitted with the
  other volumes of its shell, scaled by that shell's RISH scale maps (Eq. 3) when the shell is
  *translated*, by lambda = 1 when it is *passed through*, and rebuilt on its direction;
* a volume of a shell with **too few directions** for the SH order cannot be SH-fitted: it is
  carried through as it is (resampled, like a b0).

Shells are clusters of b-values (:func:`cluster_shells`): sorted, a value joins the current
shell while it lies within ``tolerance`` of the shell's smallest b-value. A shell is named by its
mean b-value. Which shells are translated (:func:`plan_volumes`): those the model covers (a
trained shell within ``tolerance``; every shell for a method without a model) and, with
``--shell``, only those selected; the others are passed through with lambda = 1 and a warning
(not covered) or a note (not selected).

The output is the input's table, volume for volume in the input's order, or a given table
(``--output-gradients``): its b0 rows take the input's mean b0, its diffusion-weighted rows the
SH series of the input shell within ``tolerance`` of their b-value, evaluated on their
directions (any directions: the SH basis is defined on the whole sphere).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .gradients import (
    B0_THRESHOLD,
    GradientError,
    b0_mask,
    check_gradients,
    load_gradients,
)
from .sh import DIRECTIONS_FOR_ORDER

#: ``VolumePlan.out_source`` of an output b0 that takes the input's mean b0 (given tables).
MEAN_B0 = -1


@dataclass(frozen=True)
class Shell:
    """The diffusion-weighted volumes of one shell of a gradient table."""

    bval: float
    """Mean b-value of the shell's volumes (s/mm²)."""
    index: np.ndarray
    """Indices of the shell's volumes in the table, ascending, shape (M,)."""
    bval_range: tuple[float, float] = (0.0, 0.0)
    """Smallest and largest b-value of the shell's volumes (s/mm²)."""

    @property
    def n_volumes(self) -> int:
        return int(self.index.size)


def shell_text(bval: float) -> str:
    """``b=1000``: a b-value as the messages and sidecars name a shell."""
    return f"b={float(bval):.0f}"


def cluster_shells(bvals: np.ndarray, tolerance: float = 100.0,
                   b0_threshold: float = B0_THRESHOLD) -> list[Shell]:
    """Group the diffusion-weighted volumes into shells, ascending in b.

    Sorted b-values are swept once: a value joins the current shell while it is within
    ``tolerance`` of that shell's smallest value (so no shell spans more than ``tolerance``),
    else it starts a new shell.

    Parameters
    ----------
    bvals : ndarray, shape (N,)
        b-values (s/mm²).
    tolerance : float
        Largest spread of b-values within one shell (s/mm²).

    Returns
    -------
    list of Shell
        Empty when every volume is a b0.
    """
    bvals = np.asarray(bvals, dtype=np.float64)
    dw = np.flatnonzero(~b0_mask(bvals, b0_threshold))
    order = dw[np.argsort(bvals[dw], kind="stable")]
    shells: list[Shell] = []
    start = 0
    for k in range(1, order.size + 1):
        if k == order.size or bvals[order[k]] - bvals[order[start]] > tolerance:
            members = np.sort(order[start:k])
            values = bvals[members]
            shells.append(Shell(float(values.mean()), members, (float(values.min()), float(values.max()))))
            start = k
    return shells


def find_shell(shells: Sequence[Shell], bval: float, tolerance: float) -> int | None:
    """Position in ``shells`` of the shell nearest to ``bval`` within ``tolerance``, or None."""
    best, best_gap = None, None
    for k, shell in enumerate(shells):
        gap = abs(shell.bval - float(bval))
        if gap <= tolerance and (best_gap is None or gap < best_gap):
            best, best_gap = k, gap
    return best


def shells_text(shells: Sequence[Shell]) -> str:
    """``1000 (90 directions), 2000 (90)``: the shells of a table, for messages."""
    parts = [f"{s.bval:.0f} ({s.n_volumes}{' directions' if k == 0 else ''})" for k, s in enumerate(shells)]
    return ", ".join(parts) if parts else "none"


@dataclass(frozen=True)
class ShellPlan:
    """What happens to one shell of the input."""

    shell: Shell
    fitted: bool
    """SH-fitted (its directions support the SH order); else carried through as it is."""
    translated: bool
    """Scaled by the method's scale maps; else passed through with lambda = 1 (or carried)."""
    used: bool = True
    """Written to the output (always, unless a given output table does not ask for it)."""
    note: str = ""
    """Why the shell is not translated, or not written ('' when it is translated)."""

    @property
    def bval(self) -> float:
        return self.shell.bval

    def record(self) -> dict:
        """The shell's entry of the sidecars' ``Shells`` list (JSON-ready)."""
        out = {"BValue": round(self.bval, 1), "BValueRange": [round(v, 1) for v in self.shell.bval_range],
               "InputVolumes": self.shell.n_volumes, "Written": self.used, "SHFitted": self.fitted and self.used,
               "Translated": self.translated}
        if self.note:
            out["Note"] = self.note
        return out


@dataclass(frozen=True)
class VolumePlan:
    """Every volume of one run: the input table, its shells' fates and the output table.

    ``fitted`` lists the shells that are SH-fitted (ascending b): their RISH and scale maps are
    the volume groups of the RISH/scale-map derivatives, in this order.
    """

    bvals: np.ndarray
    """Input b-values, shape (N,)."""
    bvecs: np.ndarray
    """Clean input bvecs (unit, zero for b0s), shape (N, 3)."""
    b0_index: np.ndarray
    """Input b0 volumes, shape (n_b0,)."""
    shells: tuple[ShellPlan, ...]
    """Every diffusion-weighted shell of the input, ascending."""
    out_bvals: np.ndarray
    """Output b-values, shape (N_out,)."""
    out_bvecs: np.ndarray
    """Output bvecs (FSL convention of the written image), shape (N_out, 3)."""
    out_source: np.ndarray
    """Per output volume, the input volume carried (a b0, or a volume of a shell with too few
    directions), :data:`MEAN_B0`, or -2 for a volume rebuilt from SH (see ``out_shell``)."""
    out_shell: np.ndarray
    """Per output volume, its position in :attr:`fitted` (rebuilt from that shell's SH), else -1."""
    given_table: bool = False
    """The output table was given (``--output-gradients``), not the input's."""
    warnings: tuple[str, ...] = ()
    """One-line warnings (log and ``RunWarnings``)."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """One-line notes (log, at INFO; also in the shells' records)."""

    @property
    def fitted(self) -> list[ShellPlan]:
        """The shells SH-fitted for the output, ascending."""
        return [s for s in self.shells if s.fitted and s.used]

    @property
    def read_index(self) -> np.ndarray:
        """Input volumes the run reads, ascending: b0s, fitted shells, carried volumes."""
        carried = self.out_source[self.out_source >= 0]
        fitted = [s.shell.index for s in self.fitted]
        return np.unique(np.concatenate([self.b0_index, carried, *fitted]).astype(np.int64))

    @property
    def mask_index(self) -> np.ndarray:
        """Input volumes whose mean helps the automatic brain mask: the lowest shell."""
        return self.shells[0].shell.index if self.shells else np.zeros(0, dtype=np.int64)

    def to_dict(self) -> dict:
        """JSON-ready form (:meth:`from_dict` reads it back)."""
        return {
            "bvals": self.bvals.tolist(), "bvecs": self.bvecs.tolist(), "b0_index": self.b0_index.tolist(),
            "shells": [{"bval": p.shell.bval, "index": p.shell.index.tolist(), "bval_range": list(p.shell.bval_range),
                        "fitted": p.fitted, "translated": p.translated, "used": p.used, "note": p.note}
                       for p in self.shells],
            "out_bvals": self.out_bvals.tolist(), "out_bvecs": self.out_bvecs.tolist(),
            "out_source": self.out_source.tolist(), "out_shell": self.out_shell.tolist(),
            "given_table": self.given_table, "warnings": list(self.warnings), "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict) -> VolumePlan:
        shells = tuple(ShellPlan(Shell(float(e["bval"]), np.asarray(e["index"], dtype=np.int64),
                                       tuple(float(v) for v in e["bval_range"])),
                                 fitted=bool(e["fitted"]), translated=bool(e["translated"]), used=bool(e["used"]),
                                 note=str(e["note"])) for e in d["shells"])
        return cls(bvals=np.asarray(d["bvals"], dtype=np.float64),
                   bvecs=np.asarray(d["bvecs"], dtype=np.float64).reshape(-1, 3),
                   b0_index=np.asarray(d["b0_index"], dtype=np.int64), shells=shells,
                   out_bvals=np.asarray(d["out_bvals"], dtype=np.float64),
                   out_bvecs=np.asarray(d["out_bvecs"], dtype=np.float64).reshape(-1, 3),
                   out_source=np.asarray(d["out_source"], dtype=np.int64),
                   out_shell=np.asarray(d["out_shell"], dtype=np.int64), given_table=bool(d["given_table"]),
                   warnings=tuple(d["warnings"]), notes=tuple(d["notes"]))

    def shell_records(self) -> list[dict]:
        """``Shells`` of the sidecars: one record per input shell, with ``MapVolumes``, the volumes
        of the RISH/scale-map derivatives that hold the shell (None when it is not fitted)."""
        records, position = [], 0
        for plan in self.shells:
            record = plan.record()
            record["MapShellIndex"] = None
            if plan.fitted and plan.used:
                record["MapShellIndex"] = position
                position += 1
            records.append(record)
        return records


def plan_volumes(bvals: np.ndarray, bvecs: np.ndarray, *, tolerance: float = 100.0, sh_order_max: int = 4,
                 selected: Sequence[float] | None = None, covered: Sequence[float] | None = None,
                 model_label: str = "the model", output_table: tuple[np.ndarray, np.ndarray] | None = None,
                 only_selected: bool = False, b0_threshold: float = B0_THRESHOLD) -> VolumePlan:
    """Decide the fate of every volume of a run (see the module docstring).

    Parameters
    ----------
    bvals : ndarray, shape (N,)
    bvecs : ndarray, shape (N, 3)
        Clean bvecs (:func:`~.gradients.check_gradients`).
    tolerance : float
        ``--shell-tolerance`` (s/mm²): shells are clustered with it, and a shell matches a
        requested, trained or output b-value within it.
    sh_order_max : int
        SH order of the fit (a shell needs :data:`DIRECTIONS_FOR_ORDER` directions).
    selected : sequence of float, optional
        ``--shell``: the shells to translate (None: every shell the model covers).
    covered : sequence of float, optional
        Shells the model was trained for (None: a method without a model, or a model that does
        not record it: every shell).
    model_label : str
        The model in messages, e.g. ``"the rish-global model"``.
    output_table : (bvals (N', ), bvecs (N', 3)), optional
        A given output table (checked: unit vectors, zeros for b0 rows).
    only_selected : bool
        Leave out (``used=False``) the shells ``selected`` does not name, instead of passing them
        through (the group level computes the RISH maps of the shells it trains for only).

    Raises
    ------
    GradientError
        No b0; a selected or output b-value that no input shell has (the message names the
        shells available); a selected shell with too few directions for the SH order, or an
        output shell that cannot be SH-fitted; a model that covers none of the shells that
        could be translated.
    """
    bvals = np.asarray(bvals, dtype=np.float64)
    bvecs = np.asarray(bvecs, dtype=np.float64)
    is_b0 = b0_mask(bvals, b0_threshold)
    if not is_b0.any():
        raise GradientError(f"no b0 volume (b <= {b0_threshold:g} s/mm²) in the gradient table")
    shells = cluster_shells(bvals, tolerance, b0_threshold)
    needed = DIRECTIONS_FOR_ORDER.get(int(sh_order_max), 0)
    available = f"shells available: {shells_text(shells)}"

    chosen = _selected_shells(shells, selected, tolerance, available)
    used = _used_shells(shells, output_table, tolerance, needed, b0_threshold, available)
    if only_selected and chosen is not None:
        used = [u and k in chosen for k, u in enumerate(used)]
    plans, warnings, notes = [], [], []
    for k, shell in enumerate(shells):
        fits = shell.n_volumes >= needed
        is_covered = covered is None or any(abs(shell.bval - float(b)) <= tolerance for b in covered)
        wanted = chosen is None or k in chosen
        if wanted and chosen is not None and not fits:
            raise GradientError(f"the {shell_text(shell.bval)} shell has {shell.n_volumes} directions; SH order "
                                f"{sh_order_max} (RISH L0-L{sh_order_max}) needs at least {needed}")
        translated = fits and is_covered and wanted and used[k]
        note = ""
        if not used[k]:
            note = "not in the --output-gradients table, not written" if output_table is not None else "not used"
            notes.append(f"the {shell_text(shell.bval)} shell ({shell.n_volumes} volumes) is {note}")
        elif not fits:
            note = (f"carried through unchanged (resampled, no SH fit): {shell.n_volumes} directions are too few "
                    f"for SH order {sh_order_max} ({needed} needed)")
            warnings.append(f"the {shell_text(shell.bval)} shell ({shell.n_volumes} volumes) is {note}")
        elif not is_covered:
            trained = "/".join(f"{float(b):g}" for b in covered)
            note = f"passed through unscaled (lambda = 1): {model_label} was trained for b={trained} s/mm²"
            warnings.append(f"the {shell_text(shell.bval)} shell ({shell.n_volumes} volumes) is {note}")
        elif not wanted:
            note = "passed through unscaled (lambda = 1): not selected by --shell"
            notes.append(f"the {shell_text(shell.bval)} shell ({shell.n_volumes} volumes) is {note}")
        plans.append(ShellPlan(shell, fitted=fits, translated=translated, used=used[k], note=note))
    if covered is not None and not any(p.translated for p in plans):
        _refuse_untranslatable(plans, chosen, shells, covered, tolerance, sh_order_max, needed, model_label,
                               available)
    out_bvals, out_bvecs, out_source, out_shell = _output_volumes(bvals, bvecs, is_b0, shells, plans,
                                                                  output_table, tolerance, b0_threshold)
    return VolumePlan(bvals=bvals, bvecs=bvecs, b0_index=np.flatnonzero(is_b0), shells=tuple(plans),
                      out_bvals=out_bvals, out_bvecs=out_bvecs, out_source=out_source, out_shell=out_shell,
                      given_table=output_table is not None, warnings=tuple(warnings), notes=tuple(notes))


def _refuse_untranslatable(plans, chosen, shells, covered, tolerance, sh_order_max, needed, model_label,
                           available) -> None:
    """A model that translates no shell of the run: its shells are absent (or not written, or not
    selected), or present with too few directions. Raises GradientError naming both sides."""
    for k, plan in enumerate(plans):
        in_model = any(abs(plan.bval - float(b)) <= tolerance for b in covered)
        if in_model and plan.used and (chosen is None or k in chosen) and not plan.fitted:
            raise GradientError(f"the {shell_text(plan.bval)} shell has {plan.shell.n_volumes} directions; SH "
                                f"order {sh_order_max} (RISH L0-L{sh_order_max}) needs at least {needed}")
    trained = "/".join(f"{float(b):g}" for b in covered)
    raise GradientError(f"{model_label} was trained for b={trained} s/mm², and no shell this run translates "
                        f"matches it ({available}); use a model trained for these shells (group level with "
                        "--shell) or --method identity")


def _selected_shells(shells: list[Shell], selected: Sequence[float] | None, tolerance: float,
                     available: str) -> set[int] | None:
    if selected is None:
        return None
    chosen = set()
    for b in selected:
        k = find_shell(shells, b, tolerance)
        if k is None:
            raise GradientError(f"--shell {float(b):g}: no shell within {tolerance:g} s/mm² ({available}); "
                                "use --shell / --shell-tolerance")
        chosen.add(k)
    return chosen


def _used_shells(shells: list[Shell], output_table, tolerance: float, needed: int, b0_threshold: float,
                 available: str) -> list[bool]:
    """Which input shells the output needs: all of them, or those a given table asks for."""
    if output_table is None:
        return [True] * len(shells)
    out_bvals = np.asarray(output_table[0], dtype=np.float64)
    used = [False] * len(shells)
    for b in np.unique(out_bvals[~b0_mask(out_bvals, b0_threshold)]):
        k = find_shell(shells, b, tolerance)
        if k is None:
            raise GradientError(f"the --output-gradients table asks for b={b:g} s/mm², which this run lacks "
                                f"({available}, within {tolerance:g} s/mm²)")
        if shells[k].n_volumes < needed:
            raise GradientError(f"the --output-gradients table asks for b={b:g} s/mm², but this run's "
                                f"{shell_text(shells[k].bval)} shell has {shells[k].n_volumes} directions, too few "
                                f"for the SH fit that evaluates it on other directions ({needed} needed)")
        used[k] = True
    return used


def _output_volumes(bvals, bvecs, is_b0, shells, plans, output_table, tolerance, b0_threshold):
    """``(out_bvals, out_bvecs, out_source, out_shell)`` of :class:`VolumePlan`."""
    fitted_position, position = {}, 0
    for k, plan in enumerate(plans):
        if plan.fitted and plan.used:
            fitted_position[k] = position
            position += 1
    if output_table is None:
        n = bvals.size
        source = np.full(n, -2, dtype=np.int64)
        shell_of = np.full(n, -1, dtype=np.int64)
        source[is_b0] = np.flatnonzero(is_b0)
        for k, shell in enumerate(shells):
            if k in fitted_position:
                shell_of[shell.index] = fitted_position[k]
            else:
                source[shell.index] = shell.index
        return bvals.copy(), bvecs.copy(), source, shell_of
    out_bvals = np.asarray(output_table[0], dtype=np.float64)
    out_bvecs = np.asarray(output_table[1], dtype=np.float64)
    out_b0 = b0_mask(out_bvals, b0_threshold)
    source = np.where(out_b0, MEAN_B0, -2).astype(np.int64)
    shell_of = np.full(out_bvals.size, -1, dtype=np.int64)
    for j in np.flatnonzero(~out_b0):
        shell_of[j] = fitted_position[find_shell(shells, out_bvals[j], tolerance)]
    return out_bvals.copy(), out_bvecs.copy(), source, shell_of


def load_output_table(bval_file, bvec_file) -> tuple[np.ndarray, np.ndarray]:
    """Read and check a given output table (``--output-gradients``): ``(bvals (N,), clean bvecs
    (N, 3))``.

    Raises
    ------
    GradientError
        Unreadable or ill-formed files, and every problem :func:`check_output_table` finds.
    """
    bvals, bvecs = load_gradients(bval_file, bvec_file)
    return bvals, check_output_table(bvals, bvecs)


def check_output_table(bvals: np.ndarray, bvecs: np.ndarray, b0_threshold: float = B0_THRESHOLD) -> np.ndarray:
    """Check a given output gradient table; return its clean bvecs (unit, zero for b0 rows).

    Raises
    ------
    GradientError
        A count mismatch between the two files, negative or non-finite b-values, b-values in a
        wrong unit, or a diffusion-weighted row without a unit direction.
    """
    bvals = np.asarray(bvals, dtype=np.float64)
    bvecs = np.asarray(bvecs, dtype=np.float64)
    if bvals.shape[0] != bvecs.shape[0]:
        raise GradientError(f"the bval file has {bvals.shape[0]} entries but the bvec file has {bvecs.shape[0]}")
    return check_gradients(bvals, bvecs, bvals.shape[0], b0_threshold)


__all__ = [
    "MEAN_B0",
    "Shell",
    "ShellPlan",
    "VolumePlan",
    "check_output_table",
    "cluster_shells",
    "find_shell",
    "load_output_table",
    "plan_volumes",
    "shell_text",
    "shells_text",
]
