# Reference reward program for MiniGrid-UnlockPickup-v0, written by hand for this repository (not by a VLM):
# the baseline that coder-written programs are compared against. It passes the same verification.
# Sub-task 3: drop the key (the agent cannot pick the box up while it carries the key). The key is drawn again:
# a cell with 4 to 8 pixels of a pure MiniGrid colour on black, as in sub-task 1.
# Why not "pick up the box": toggling a box destroys it, and that frame cannot be told apart from the frame in
# which the box was picked up; a program "the box is gone" rewards destroying the box, and PPO learned just that.
# Picking the box up is what the env's own reward pays for.
import numpy as np

COLOURS = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [112, 39, 195], [255, 255, 0], [100, 100, 100]]


def check(frame):
    tile = frame.shape[1] // 11
    cells = frame[: 6 * tile, : 11 * tile].reshape(6, tile, 11, tile, 3).swapaxes(1, 2)
    for colour in COLOURS:
        pure = np.all(cells == np.array(colour), axis=-1).sum(axis=(2, 3))
        if np.any((pure >= 4) & (pure <= 8)):
            return True
    return False
