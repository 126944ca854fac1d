# Reference reward program for MiniGrid-DoorKey-8x8-v0, written by hand for this repository (not by a VLM):
# the baseline that coder-written programs are compared against. It passes the same verification.
# Sub-task 2: open the door. A locked door is a yellow square filled with dark yellow (114, 114, 0), 0.45 of
# yellow; an open door is a thin bar at the side of its cell.
import numpy as np


def check(frame):
    dark_yellow = (frame[:, :, 0] == 114) & (frame[:, :, 1] == 114) & (frame[:, :, 2] == 0)
    tile = frame.shape[0] // 8
    return int(np.count_nonzero(dark_yellow)) < tile * tile // 4
