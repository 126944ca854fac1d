# Reference reward program for MiniGrid-UnlockPickup-v0, written by hand for this repository (not by a VLM):
# the baseline that coder-written programs are compared against. It passes the same verification.
# Sub-task 2: open the door. A locked door is a square filled with 0.45 of its colour (e.g. (114, 114, 0) for
# yellow); an open door is a thin bar at the side of its cell.
import numpy as np

DARK_COLOURS = [[114, 0, 0], [0, 114, 0], [0, 0, 114], [50, 17, 87], [114, 114, 0], [45, 45, 45]]


def check(frame):
    tile = frame.shape[1] // 11
    for colour in DARK_COLOURS:
        if np.count_nonzero(np.all(frame == np.array(colour), axis=-1)) >= tile * tile // 4:
            return False
    return True
