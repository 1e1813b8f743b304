"""khanrc/swad's LossValley decisions (domainbed/swad.py), transcribed on recorded loss sequences.

Segments carry only their id, steps and end loss; the averaged model is replaced by a log of the
calls swad.py makes on it (AveragedModel(segment) -> ["start", id], update_parameters -> ["add", id]),
so that tests/swad.rs can compare mgrun's decisions and averaged segments with the published rules.

Input (stdin): {"scenarios": [{"n_converge", "n_tolerance", "tolerance_ratio", "losses": [...]}]}
Segment i ends at step i and has loss losses[i]. Output (stdout): one object per scenario with
"decisions" (one name per evaluation), "updates" (during training) and "final"
({"kind": "last", "id"} or {"kind": "averaged", "leftovers": [...]}) and "threshold_bits" (the
threshold's float64 bits, null before convergence).
"""

import json
import struct
import sys
from collections import deque

import numpy as np


class Segment:
    def __init__(self, seg_id, loss):
        self.id = seg_id
        self.start_step = seg_id
        self.end_step = seg_id
        self.end_loss = loss


class AveragedLog:
    """Stands for swa_utils.AveragedModel: records which segments it averages."""

    def __init__(self, segment, log):
        self.log = log
        self.log.append(["start", segment.id])

    def update_parameters(self, segment, **_):
        self.log.append(["add", segment.id])


class LossValley:
    def __init__(self, n_converge, n_tolerance, tolerance_ratio):
        self.n_converge = n_converge
        self.n_tolerance = n_tolerance
        self.tolerance_ratio = tolerance_ratio
        self.converge_Q = deque(maxlen=n_converge)
        self.smooth_Q = deque(maxlen=n_tolerance)
        self.final_model = None
        self.converge_step = None
        self.dead_valley = False
        self.threshold = None
        self.log = []

    def get_smooth_loss(self, idx):
        return min([model.end_loss for model in list(self.smooth_Q)[idx:]])

    @property
    def is_converged(self):
        return self.converge_step is not None

    def update_and_evaluate(self, segment):
        """swad.py's update_and_evaluate; returns the decision's name."""
        if self.dead_valley:
            return "after_dead"
        self.converge_Q.append(segment)
        self.smooth_Q.append(segment)

        if not self.is_converged:
            if len(self.converge_Q) < self.n_converge:
                return "wait"
            min_idx = np.argmin([model.end_loss for model in self.converge_Q])
            untilmin = self.converge_Q[min_idx]
            if min_idx != 0:
                return "wait"
            self.converge_step = self.converge_Q[0].end_step
            self.final_model = AveragedLog(untilmin, self.log)
            th_base = np.mean([model.end_loss for model in self.converge_Q])
            self.threshold = th_base * (1.0 + self.tolerance_ratio)
            if self.n_tolerance < self.n_converge:
                for i in range(self.n_converge - self.n_tolerance):
                    self.final_model.update_parameters(self.converge_Q[1 + i])
            elif self.n_tolerance > self.n_converge:
                converge_idx = self.n_tolerance - self.n_converge
                Q = list(self.smooth_Q)[: converge_idx + 1]
                start_idx = 0
                for i in reversed(range(len(Q))):
                    if Q[i].end_loss > self.threshold:
                        start_idx = i + 1
                        break
                for model in Q[start_idx + 1 :]:
                    self.final_model.update_parameters(model)
            return "converge"

        if self.smooth_Q[0].end_step < self.converge_step:
            return "pending"
        if self.get_smooth_loss(0) > self.threshold:
            self.dead_valley = True
            return "dead"
        self.final_model.update_parameters(self.smooth_Q[0])
        return "add"

    def get_final_model(self):
        if not self.is_converged:
            return {"kind": "last", "id": self.converge_Q[-1].id}
        during = len(self.log)
        if not self.dead_valley:
            self.smooth_Q.popleft()
            while self.smooth_Q:
                if self.get_smooth_loss(0) > self.threshold:
                    break
                self.final_model.update_parameters(self.smooth_Q.popleft())
        return {"kind": "averaged", "leftovers": self.log[during:]}


def run(scenario):
    valley = LossValley(scenario["n_converge"], scenario["n_tolerance"], scenario["tolerance_ratio"])
    decisions = []
    for i, loss in enumerate(scenario["losses"]):
        decision = valley.update_and_evaluate(Segment(i, loss))
        decisions.append(decision)
        if decision == "dead":
            # trainer.py breaks out of the loop here.
            break
    updates = list(valley.log)
    return {
        "decisions": decisions,
        "updates": updates,
        "final": valley.get_final_model(),
        # As its IEEE bits: the exact value, whatever the JSON reader's float parsing.
        "threshold_bits": None if valley.threshold is None else struct.unpack("<Q", struct.pack("<d", valley.threshold))[0],
    }


def main():
    scenarios = json.load(sys.stdin)["scenarios"]
    json.dump([run(s) for s in scenarios], sys.stdout)


if __name__ == "__main__":
    main()
