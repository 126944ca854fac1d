"""The `openai:` backends of ppo_lvlm2p_distill.py (OpenAITeacher) and vlm_car_reward.py (OpenAICoder): their normal
work against a real OpenAI-compatible server (`transformers serve` of the committed tiny random SmolVLM), and each
fault against the misbehaving server of openai_server.py: a bounded time, a counted failure, never a traceback."""

import functools
import resource
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from openai_server import OpenAIServer, request_parts, serving_missing, transformers_serve
from script_helpers import exit_message, run_as_main, scalar_tags
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import car_coders
import lvlm2p_teachers as teachers
import ppo_lvlm2p_distill as lvlm2p
import text_envs
import vlm_car_reward as car

REPO_ROOT = Path(__file__).resolve().parents[1]
ACTIONS = text_envs.PRIMITIVE_ACTION_NAMES
PROBS = [0.1, 0.1, 0.8, 0, 0, 0, 0]
SCENE = "The agent is at row 2."
SECRET = "sk-test-0123456789-do-not-log"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """`transformers serve` of assets/tiny-smolvlm on loopback: its base URL and the model's name."""
    if reason := serving_missing():
        pytest.skip(reason)
    model = str(REPO_ROOT / "assets" / "tiny-smolvlm")
    with transformers_serve(model, tmp_path_factory.mktemp("serve")) as base_url:
        yield base_url, model


@pytest.fixture(scope="module")
def frames() -> list[teachers.Frame]:
    """Two frames of LavaGap as the teacher sees them."""
    env = text_envs.make_env("LavaGap", seed=0, image_size=32)
    first, _ = env.reset()
    second, *_ = env.step(2)
    return [teachers.Frame(obs["image"], obs["mission"], -1) for obs in (first, second)]


def openai_teacher(base_url: str, model: str = "test-vlm", **options) -> teachers.OpenAITeacher:
    """The teacher of ppo_lvlm2p_distill.py's openai: backend, with the script's prompts and parser."""
    options = {"timeout": 5.0, "retries": 2, "backoff": 0.01, "cooldown": 60.0, **options}
    prompts = functools.partial(lvlm2p.stage_prompts, action_names=ACTIONS, examples="")
    parse = functools.partial(lvlm2p.parse_teacher_probs, n_actions=len(ACTIONS))
    return teachers.OpenAITeacher(model, base_url, SECRET, prompts, parse, 8, **options)


def openai_coder(base_url: str, model: str = "test-vlm", **options) -> car_coders.OpenAICoder:
    """The coder of vlm_car_reward.py's openai: backend."""
    options = {"timeout": 5.0, "retries": 2, "backoff": 0.01, **options}
    return car_coders.OpenAICoder(model, base_url, SECRET, 8, **options)


def scripted_reply(body: dict) -> str:
    """Stage 1: a description; stage 2: the probabilities."""
    return SCENE if len(body["messages"]) == 1 else str(PROBS)


def scalars(run: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# --- a real server: transformers serve ------------------------------------------------------------------------------


def test_teacher_asks_in_two_stages_through_transformers_serve(served, frames):
    base_url, model = served
    teacher = openai_teacher(base_url, model)
    second_replies = []
    teacher.parse = lambda reply: second_replies.append(reply) or lvlm2p.parse_teacher_probs(reply, len(ACTIONS))
    replies = teacher(frames)
    # a random-weight model answers, though not with 7 probabilities: no distribution, no failure
    assert len(second_replies) == 2 and all(reply is None or reply.shape == (7,) for reply in replies)
    assert teacher.breaker.in_a_row == 0

    # a model the server does not serve: HTTP 400, not retried, a counted failure
    (reply,) = openai_teacher(base_url, "not-served")(frames[:1])
    assert isinstance(reply, teachers.NoReply) and "HTTP 400" in reply.reason and not reply.skipped


def test_teacher_run_through_transformers_serve(served, tmp_path, monkeypatch):
    base_url, model = served
    flags = ["--num-envs", "1", "--num-steps", "8", "--num-minibatches", "2", "--total-timesteps", "8"]
    flags += ["--checkpoint-freq", "0", "--teacher-image-size", "32", "--teacher-max-new-tokens", "4"]
    run_as_main(
        str(REPO_ROOT / "ppo_lvlm2p_distill.py"),
        monkeypatch,
        tmp_path,
        *["--teacher", f"openai:{model}", "--teacher-base-url", base_url, *flags],
    )
    (run,) = (tmp_path / "runs").iterdir()
    logged = scalars(run)
    assert logged["teacher/queries"][-1] > 0
    assert logged["teacher/server_failures"] == [0] and logged["teacher/skipped"] == [0]


def test_coder_stages_through_transformers_serve(served, tmp_path, monkeypatch):
    base_url, model = served
    argv = ["--env-id", "DoorKey", "--coder", f"openai:{model}", "--coder-base-url", base_url, "--max-rounds", "1"]
    argv += ["--num-expert", "1", "--num-random", "1", "--max-new-tokens", "8", "--total-timesteps", "0"]
    message = exit_message(str(REPO_ROOT / "vlm_car_reward.py"), monkeypatch, tmp_path, *argv)  # stage 1
    assert message.startswith("The coder listed no sub-tasks (a numbered list) in 1 attempt(s)")

    obs, _ = text_envs.make_env("DoorKey", seed=0).reset()
    frame = obs["image"]
    prompt = car.program_prompt(obs["mission"], ["pick up the key"], 0, "frame", frame.shape, (5, 5), 8)
    code, program, error = car.read_program(openai_coder(base_url, model)(prompt, [frame]))  # stage 2
    assert (code, program) == ("", car.NEVER_DONE) and "no `def check(frame)`" in error

    argv[argv.index(f"openai:{model}")] = "openai:not-served"
    message = exit_message(str(REPO_ROOT / "vlm_car_reward.py"), monkeypatch, tmp_path, *argv)
    assert (
        message.startswith("The coder did not answer (") and "gave no reply in 1 tries, the last: HTTP 400" in message
    )


# --- faults: the misbehaving server ---------------------------------------------------------------------------------


def timed(call):
    """What `call()` returns, and the seconds it took."""
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


@pytest.mark.parametrize("failure", ["hang", "drip"])
def test_a_server_that_hangs_or_drips_costs_the_deadline(frames, failure):
    with OpenAIServer(scripted_reply, failures=10, failure=failure, drip_seconds=1.0, hang_seconds=10) as server:
        (reply,), seconds = timed(lambda: openai_teacher(server.base_url, timeout=1.5)(frames[:1]))
        assert isinstance(reply, teachers.NoReply) and "no reply within 1.5 s" in reply.reason
        assert 1.5 <= seconds < 3 and len(server.requests) == 1  # the deadline spent: no retry

        start = time.monotonic()
        with pytest.raises(
            car_coders.CoderUnavailable, match="gave no reply in 1 tries, the last: no reply within 1.5 s"
        ):
            openai_coder(server.base_url, timeout=1.5)("hi", [])
        assert time.monotonic() - start < 3


@pytest.mark.parametrize("failure", ["status", "rate limit"])
def test_5xx_and_429_are_retried(frames, failure):
    with OpenAIServer(scripted_reply, failures=2, failure=failure, retry_after="0.5") as server:
        (probs,) = openai_teacher(server.base_url)(frames[:1])
    assert np.allclose(probs, PROBS) and len(server.requests) == 4  # two failed, then both stages
    assert set(server.auth) == {f"Bearer {SECRET}"}
    text, images = request_parts(server.requests[0])
    assert frames[0].mission in text and len(images) == 1 and images[0].startswith(b"\x89PNG")
    if failure == "rate limit":  # each retry after the server's Retry-After
        assert server.times[1] - server.times[0] >= 0.45 and server.times[2] - server.times[1] >= 0.45

    with OpenAIServer(scripted_reply, failures=1, failure=failure, retry_after="0.5") as server:
        assert openai_coder(server.base_url)("hi", []) == SCENE and len(server.requests) == 2


def test_a_retry_after_beyond_the_deadline_is_not_waited_for(frames):
    with OpenAIServer(scripted_reply, failures=10, failure="rate limit", retry_after="30") as server:
        (reply,), seconds = timed(lambda: openai_teacher(server.base_url, timeout=5)(frames[:1]))
    assert isinstance(reply, teachers.NoReply) and "HTTP 429" in reply.reason
    assert seconds < 1 and len(server.requests) == 1


@pytest.mark.parametrize(
    "failure, reason",
    [
        ("bad request", "HTTP 400"),
        ("garbage", "not a chat completion (Expecting value"),
        ("nested", "not a chat completion (JSON nested too deeply)"),
        ("huge", f"a reply larger than {teachers.MAX_REPLY_BYTES} bytes"),
    ],
)
def test_replies_that_retrying_cannot_mend_fail_once(frames, failure, reason):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with OpenAIServer(scripted_reply, failures=10, failure=failure) as server:
        (reply,), seconds = timed(lambda: openai_teacher(server.base_url)(frames[:1]))
        assert isinstance(reply, teachers.NoReply) and reason in reply.reason and not reply.skipped
        assert seconds < 2 and len(server.requests) == 1
        with pytest.raises(car_coders.CoderUnavailable, match="gave no reply in 1 tries, the last: "):
            openai_coder(server.base_url)("hi", [])
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100 * 1024  # not the 300 MB of "huge"


def test_content_as_a_list_of_parts_is_joined(frames):
    with OpenAIServer(scripted_reply, parts=True) as server:
        (probs,) = openai_teacher(server.base_url)(frames[:1])
        assert np.allclose(probs, PROBS)
        assert openai_coder(server.base_url)("hi", []) == SCENE


def test_the_circuit_breaker_opens_on_a_failing_server_and_closes_when_it_answers(frames):
    batch = [teachers.Frame(np.full((8, 8, 3), i, np.uint8), "go", -1) for i in range(8)]
    keys = [lvlm2p.frame_key(frame.image, frame.mission) for frame in batch]
    with OpenAIServer(scripted_reply, failures=10**6) as server:
        teacher, cache = openai_teacher(server.base_url, cooldown=0.5), {}
        _, valid, stats = lvlm2p.label_frames(teacher, batch, keys, cache, len(ACTIONS), 8)
        assert not valid.any() and stats.server_failures == 8 and len(server.requests) < 16  # retries stopped
        asked = len(server.requests)
        _, valid, stats = lvlm2p.label_frames(teacher, batch, keys, cache, len(ACTIONS), 8)
        assert stats.skipped == 8 and len(server.requests) == asked  # open: nothing sent

        time.sleep(0.5)  # the cooldown over, one request tries again, fails, and the breaker opens again
        _, valid, stats = lvlm2p.label_frames(teacher, batch, keys, cache, len(ACTIONS), 8)
        assert (stats.server_failures, stats.skipped) == (1, 7) and len(server.requests) == asked + 1

        server.failures = 0  # the server is back: after the cooldown a reply closes the breaker
        time.sleep(0.5)
        _, valid, stats = lvlm2p.label_frames(teacher, batch, keys, cache, len(ACTIONS), 8)
        assert stats.server_failures == 0 and valid.sum() >= 1 and teacher.breaker.in_a_row == 0
        _, valid, stats = lvlm2p.label_frames(teacher, batch, keys, cache, len(ACTIONS), 8)
        assert valid.all() and len(cache) == 8


def test_a_failing_frame_keeps_its_batchs_replies(frames):
    with OpenAIServer(scripted_reply, failures=1, failure="bad request") as server:
        replies = openai_teacher(server.base_url)(frames)
    assert sum(isinstance(reply, teachers.NoReply) for reply in replies) == 1
    assert sum(isinstance(reply, np.ndarray) for reply in replies) == 1 and len(server.requests) == 3


def test_a_dead_teacher_server_costs_little(tmp_path, monkeypatch, capsys):
    flags = ["--num-envs", "2", "--num-steps", "16", "--num-minibatches", "2", "--total-timesteps", "64"]
    flags += ["--checkpoint-freq", "0", "--teacher-image-size", "32", "--teacher", "openai:gone"]
    with socket.socket() as closed:  # a port nothing listens on: each request refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    start = time.monotonic()
    run_as_main(
        str(REPO_ROOT / "ppo_lvlm2p_distill.py"),
        monkeypatch,
        tmp_path,
        *[*flags, "--teacher-base-url", f"http://127.0.0.1:{port}/v1"],
    )
    assert time.monotonic() - start < 30  # the breaker opens before the first retry's backoff (1 + 2 + 4 s)
    (run,) = (tmp_path / "runs").iterdir()
    logged = scalars(run)
    assert sum(logged["teacher/skipped"]) > 0 and "teacher/skipped" in scalar_tags(run)
    assert "not asked for a while" in capsys.readouterr().out
