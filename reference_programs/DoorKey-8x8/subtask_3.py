# Reference reward program for MiniGrid-DoorKey-8x8-v0, written by hand for this repository (not by a VLM):
# the baseline that coder-written programs are compared against. It passes the same verification.
# Sub-task 3: reach the goal. The goal is the only green (0, 255, 0) cell; the agent standing on it covers
# part of it with its red triangle.
import numpy as np


def check(frame):
    green = (frame[:, :, 0] == 0) & (frame[:, :, 1] == 255) & (frame[:, :, 2] == 0)
    tile = frame.shape[0] // 8
    return 0 < int(np.count_nonzero(green)) < tile * tile
