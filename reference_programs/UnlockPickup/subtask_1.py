# Reference reward program for MiniGrid-UnlockPickup-v0, written by hand for this repository (not by a VLM):
# the baseline that coder-written programs are compared against. It passes the same verification.
# Sub-task 1: pick up the key. Frames of 8-pixel tiles, 11 x 6 cells. Colours vary from episode to episode, so
# cells are told apart by shape: a key cell has 4 to 8 pixels of a pure MiniGrid colour on black (the agent's
# triangle has 10 or more, a wall fills its cell, doors and boxes have none), and a carried key is not drawn.
import numpy as np

COLOURS = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [112, 39, 195], [255, 255, 0], [100, 100, 100]]


def check(frame):
    tile = frame.shape[1] // 11
    cells = frame[: 6 * tile, : 11 * tile].reshape(6, tile, 11, tile, 3).swapaxes(1, 2)
    for colour in COLOURS:
        pure = np.all(cells == np.array(colour), axis=-1).sum(axis=(2, 3))
        if np.any((pure >= 4) & (pure <= 8)):
            return False
    return True
