"""benchmarks/bench_peers.py gives its peers the scripts' network: the same layers, the same outputs for the same
weights. Skipped where the peers (benchmarks/requirements-peers.txt) are not installed."""

import pathlib
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")
pytest.importorskip("torch_ac")
from stable_baselines3.common.policies import ActorCriticPolicy  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_peers  # noqa: E402

import ppo_cnn_baseline  # noqa: E402
import ppo_lvlm2p_distill  # noqa: E402


def scripts_agent(env_id: str) -> tuple[ppo_cnn_baseline.Agent, object]:
    envs = ppo_cnn_baseline.make_envs(ppo_cnn_baseline.Args(env_id=env_id, obs="state", num_envs=1), run_name="")
    torch.manual_seed(0)
    agent = ppo_cnn_baseline.Agent(envs, "state")
    envs.close()
    return agent, envs


def random_states(space, n: int = 8) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.as_tensor(rng.integers(0, int(space.high.max()) + 1, (n, *space.shape)), dtype=torch.float32)


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("env_id", ["FrozenLake8x8", "MiniGrid-DoorKey-5x5-v0"])
@pytest.mark.parametrize("channels_first", [False, True])  # SB3 moves MiniGrid's channels first (VecTransposeImage)
def test_sb3_policy_is_the_scripts_network(env_id, channels_first):
    agent, envs = scripts_agent(env_id)
    space = envs.single_observation_space
    seen = space
    if channels_first:
        seen = type(space)(0, space.high.max(), (space.shape[2], *space.shape[:2]), space.dtype)
    policy = ActorCriticPolicy(seen, envs.single_action_space, lambda _: 1e-3, **bench_peers.sb3_policy_kwargs(space))
    assert num_parameters(policy) == num_parameters(agent)
    policy.features_extractor.network.load_state_dict(agent.network.state_dict())
    policy.mlp_extractor.policy_net[0].load_state_dict(agent.actor[0].state_dict())
    policy.action_net.load_state_dict(agent.actor[2].state_dict())
    policy.mlp_extractor.value_net[0].load_state_dict(agent.critic[0].state_dict())
    policy.value_net.load_state_dict(agent.critic[2].state_dict())
    x = random_states(space)
    with torch.no_grad():
        hidden = agent.encode(x)
        x_seen = x.permute(0, 3, 1, 2) if channels_first else x
        logits = policy.get_distribution(x_seen).distribution.logits
        torch.testing.assert_close(logits, torch.log_softmax(agent.actor(hidden), dim=1))
        torch.testing.assert_close(policy.predict_values(x_seen), agent.critic(hidden))


def test_torch_ac_model_wraps_the_scripts_agent():
    agent, envs = scripts_agent("MiniGrid-DoorKey-5x5-v0")
    model = bench_peers.TorchAcModel(agent)
    assert num_parameters(model) == num_parameters(agent)
    x = random_states(envs.single_observation_space)
    with torch.no_grad():
        dist, value = model(x)
        action = torch.arange(len(x)) % envs.single_action_space.n
        _, logprob, entropy, expected_value = agent.get_action_and_value(x, action)
    torch.testing.assert_close(dist.log_prob(action), logprob)
    torch.testing.assert_close(dist.entropy(), entropy)
    torch.testing.assert_close(value, expected_value.squeeze(1))


def test_the_students_network_is_the_same():
    """The peers build ppo_cnn_baseline's Agent; the LVLM2P student's has the same layers."""
    envs = ppo_lvlm2p_distill.make_envs(ppo_lvlm2p_distill.Args(env_id="LavaGap", num_envs=1, teacher_image_size=16))
    student = ppo_lvlm2p_distill.Agent(envs)
    peer = bench_peers.build_agent(envs.single_observation_space["state"], envs.single_action_space)
    envs.close()
    assert {k: v.shape for k, v in student.state_dict().items()} == {k: v.shape for k, v in peer.state_dict().items()}
