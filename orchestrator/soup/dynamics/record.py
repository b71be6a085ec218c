"""Recording training dynamics inside a fine-tuning loop, at almost no cost: the training forward
pass already computed every example's logits, so per batch this is a softmax and a gather.

Examples are keyed by their stable id (their position in the task's training set), which
survives shuffling, subsets and data-parallel sharding. Only finished epochs are kept, and they
travel in the trial's checkpoint: a trial resumed after a crash records each epoch once.
"""

from __future__ import annotations

import pandas as pd
import torch

COLUMNS = ("id", "epoch", "p_gold", "correct")


class Recorder:
    def __init__(self):
        self.epochs: dict[int, dict[str, torch.Tensor]] = {}  # finished epochs, on the CPU
        self._batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def add(self, ids: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch: `logits` of the examples `ids` whose training labels are `labels`."""
        p = logits.detach().float().softmax(1)
        # kept on the device: a copy to the CPU per batch would wait for the GPU every step
        self._batches.append((ids, p.gather(1, labels[:, None])[:, 0], p.argmax(1) == labels))

    def end_epoch(self, epoch: int, world: int = 1) -> None:
        """Close an epoch; with data-parallel workers, every rank gets every rank's examples."""
        ids, p_gold, correct = (torch.cat([b[i].cpu() for b in self._batches]) if self._batches
                                else torch.empty(0) for i in range(3))
        self._batches = []
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, (ids, p_gold, correct))
            ids, p_gold, correct = (torch.cat([g[i] for g in gathered]) for i in range(3))
        order = ids.argsort()
        self.epochs[epoch] = {"id": ids[order].long(), "p_gold": p_gold[order].float(),
                              "correct": correct[order].bool()}

    def state(self) -> dict[str, torch.Tensor]:
        """The finished epochs as plain tensors (a checkpoint loads them with weights_only=True)."""
        frame = self.frame()
        return {c: torch.tensor(frame[c].to_numpy()) for c in COLUMNS}

    def restore(self, state: dict[str, torch.Tensor], epochs: int) -> None:
        """The epochs before `epochs` from a checkpoint's state; any later ones are dropped."""
        self.epochs = {}
        for e in range(epochs):
            keep = state["epoch"] == e
            self.epochs[e] = {"id": state["id"][keep], "p_gold": state["p_gold"][keep], "correct": state["correct"][keep]}

    def frame(self, flipped: torch.Tensor | None = None) -> pd.DataFrame:
        """One row per (id, epoch); with `flipped` (by id), whether that example's label was flipped."""
        parts = [pd.DataFrame({"id": t["id"].numpy(), "epoch": e, "p_gold": t["p_gold"].numpy(),
                               "correct": t["correct"].numpy()}) for e, t in sorted(self.epochs.items())]
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({c: [] for c in COLUMNS})
        frame = frame.astype({"id": "int64", "epoch": "int32", "p_gold": "float32", "correct": "bool"})
        if flipped is not None:
            frame["flipped"] = flipped.numpy()[frame["id"].to_numpy()]
        return frame


def dynamics_row_id(trial_id: str) -> str:
    """The pool id of a trial's dynamics row (its parent is the trial)."""
    return f"{trial_id}.dynamics"
