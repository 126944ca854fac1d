# Reference reward program for MiniGrid-DoorKey-8x8-v0, written by hand for this repository (not by a VLM):
# the baseline that coder-written programs are compared against. It passes the same verification.
# Sub-task 1: pick up the key. Frames of 8-pixel tiles: the key is the only object drawn with pure yellow
# (255, 255, 0) pixels (the door's are darker), and a carried object is not drawn.
import numpy as np


def check(frame):
    pure_yellow = (frame[:, :, 0] == 255) & (frame[:, :, 1] == 255) & (frame[:, :, 2] == 0)
    return not np.any(pure_yellow)
