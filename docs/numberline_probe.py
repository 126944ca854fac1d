"""What a CoT model reads and concludes on each of NumberLine's 30 states (target != current), for the results of
docs/ppo_vlm_cot.md:

    python docs/numberline_probe.py assets/tiny-smolvlm-cot [runs/RUN/model/adapter]

1. Its greedy answer: how often the "current number" and "target number" it writes are the true ones, and how often
   its action is the expert's.
2. For each state, with the answer written from the true state up to "The current number C is", the probability
   of the right next word ("below" when the target is larger, else "above") against the wrong one, at temperature 1
   and at the sampling temperature (--temperature, 0.2 as in ppo_vlm_cot.py).
"""

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ppo_vlm_cot as cot  # noqa: E402
import sft_vlm  # noqa: E402
import text_envs  # noqa: E402
from cot_models import load_base_model  # noqa: E402


def probe(model: torch.nn.Module, processor: object, temperature: float) -> tuple[dict[str, float], np.ndarray]:
    """Greedy reading and action rates over the 30 states, and p(right comparison word) [target, current, T=1 / T]."""
    tokenizer, names = processor.tokenizer, ["-", "+"]
    env = text_envs.make_env("NumberLine", 0)
    states = [(t, c) for t in range(6) for c in range(6) if t != c]
    prompts, images, answers = [], [], []
    for target, current in states:
        obs, info = env.reset(options={"target": target, "current": current})
        text = cot.task_prompt("NumberLine", names, obs["mission"], obs["text"], "")
        prompts.append(cot.chat_prompt(processor, text))
        images.append(obs["image"])
        expert = int(target > current)
        answers.append(sft_vlm.cot_answer("NumberLine", names, obs, info, expert, expert, True))

    with torch.no_grad():
        ids, mask, _, _ = cot.generate(model, processor, prompts, np.stack(images), 0.0, 64)
    texts = [cot.split_output(tokenizer, row[m].tolist())[0] for row, m in zip(ids, mask)]
    rates = {"current number": [], "target number": [], "expert's action": []}
    for (target, current), text in zip(states, texts):
        for key, true in (("current number", current), ("target number", target)):
            found = re.search(rf'"{key}": "(\d+)"', text)
            rates[key].append(bool(found) and int(found.group(1)) == true)
        rates["expert's action"].append(cot.parse_action(text, names) == int(target > current))

    word = {w: tokenizer(w, add_special_tokens=False)["input_ids"] for w in (" below", " above")}
    assert all(len(v) == 1 for v in word.values()), "each comparison word must be one token"
    table = np.full((6, 6, 2), np.nan)
    for (target, current), prompt, image, answer in zip(states, prompts, images, answers):
        upto = answer[: answer.index(" is ") + len(" is")]  # ... "The current number C is"
        prefix = tokenizer(upto, add_special_tokens=False, return_tensors="pt")["input_ids"]
        enc = cot.encode_prompts(processor, [prompt], image[None], model.device)
        pixels = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        with torch.no_grad():
            logits = model(input_ids=torch.cat([enc["input_ids"], prefix], 1), **pixels).logits[0, -1]
        right, wrong = (word[" below"], word[" above"]) if target > current else (word[" above"], word[" below"])
        pair = logits[[right[0], wrong[0]]]
        table[target, current] = pair.softmax(-1)[0], (pair / temperature).softmax(-1)[0]
    return {key: float(np.mean(v)) for key, v in rates.items()}, table


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="a model folder (what --model-id takes)")
    parser.add_argument("adapter", nargs="?", help="a LoRA adapter on it (runs/RUN/model/adapter of a PPO run)")
    parser.add_argument("--temperature", type=float, default=0.2)
    args = parser.parse_args()
    model, processor = load_base_model(args.model, False, torch.device("cpu"))
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    rates, table = probe(model, processor, args.temperature)
    print("greedy, 30 states: " + ", ".join(f"{key} {rate:.2f}" for key, rate in rates.items()))
    print(f"p(right comparison word), temperature 1 / {args.temperature}; rows: target, columns: current number 0-5")
    for target in range(6):
        cells = ["    -    " if target == c else "{:.2f}/{:.2f}".format(*table[target, c]) for c in range(6)]
        print(f"target {target}: " + " ".join(cells))
