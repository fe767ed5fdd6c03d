"""Run configs: YAML loading, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlfb.config import RunConfig, config_from_dict, field_help, load_config, parse_yaml
from rlfb.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_sections_and_shorthands_load(tmp_path: Path) -> None:
    path = write(tmp_path, """
task: arithmetic
model: rlfb-tiny
rewards:
  - exact_match
  - {name: length, weight: -0.1, kwargs: {target: 5}}
agent: {name: grpo, learning_rate: 1e-4, epochs: 2}
budget: {updates: 7, num_envs: 8, group_size: 4}
seed: 3
""")
    config = load_config(path)
    assert config.task.name == "arithmetic"
    assert config.model.name == "rlfb-tiny"
    assert [(r.name, r.weight, r.kwargs) for r in config.rewards] == [
        ("exact_match", 1.0, {}), ("length", -0.1, {"target": 5})]
    assert config.agent.name == "grpo"
    assert config.agent.params == {"learning_rate": 1e-4, "epochs": 2}  # 1e-4 read as a float
    assert (config.budget.updates, config.budget.num_envs, config.budget.group_size) == (7, 8, 4)
    assert config.sampling.max_new_tokens == RunConfig().sampling.max_new_tokens  # defaults fill the rest
    assert config.seed == 3


def test_overrides_are_yaml_typed_and_reach_lists_and_agent_params(tmp_path: Path) -> None:
    path = write(tmp_path, "rewards: [sentiment]\nagent: {name: ppo}\n")
    config = load_config(path, ["budget.updates=5", "sampling.temperature=0.7", "rewards.0.weight=2",
                                "agent.kl_coef=0.05", "lora.target_modules=[c_attn, c_fc]", "task=arithmetic",
                                "budget.time_limit_s=null"])
    assert config.budget.updates == 5
    assert config.sampling.temperature == 0.7
    assert config.rewards[0].weight == 2.0 and isinstance(config.rewards[0].weight, float)
    assert config.agent.params == {"kl_coef": 0.05}
    assert config.lora.target_modules == ["c_attn", "c_fc"]
    assert config.task.name == "arithmetic"
    assert config.budget.time_limit_s is None


@pytest.mark.parametrize("data, overrides, message", [
    ({"budget": {"updatse": 3}}, [], r"unknown key 'budget.updatse' \(did you mean 'budget.updates'\?\)"),
    ({}, ["budget.updatse=3"], r"unknown key 'budget.updatse' .*valid keys in 'budget': updates"),
    ({"sampel": {}}, [], r"unknown key 'sampel' \(did you mean 'sampling'\?\)"),
    ({}, ["rewards.0.wieght=1"], r"unknown key 'rewards.0.wieght' \(did you mean 'rewards.0.weight'"),
    ({}, ["budget.updates=many"], r"'budget.updates' must be an integer or null, got str 'many'"),
    ({"seed": 1.5}, [], r"'seed' must be an integer, got float 1.5"),
    ({"lora": {"alpha": True}}, [], r"'lora.alpha' must be a number, got bool True"),
    ({"logging": {"tensorboard": "yes please"}}, [], r"'logging.tensorboard' must be true or false"),
    ({"rewards": [3]}, [], r"'rewards.0' must be a mapping, got int 3"),
    ({}, ["rewards.4.weight=1"], r"'rewards.4': index 4 is out of range"),
    ({}, ["budget.updates"], r"override 'budget.updates' is not of the form key=value"),
    ({"budget": {"updates": None}}, [], r"set at least one"),
    ({"budget": {"num_envs": 6, "group_size": 4}}, [], r"'budget.num_envs' is 6; it must be a positive multiple"),
    ({"sampling": {"temperature": 0}}, [], r"'sampling.temperature' is 0.0; it must be > 0"),
    ({"device": "gpu"}, [], r"'device' is 'gpu'; it must be auto, cpu, cuda, cuda:N"),
    ({}, ["device=cuda:x"], r"'device' is 'cuda:x'"),
    ({"threads": 0}, [], r"'threads' is 0; it must be >= 1, or null"),
    ({}, ["reward_scale.clip=-1"], r"'reward_scale.clip' is -1.0; it must be > 0"),
    ({}, ["reward_scale.normalise=true"], r"did you mean 'reward_scale.normalize'"),
])
def test_bad_configs_raise_naming_the_key(data: dict, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data, overrides)


def test_missing_file_and_non_mapping_raise(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist$"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path, "task: sentiment\n")
    with pytest.raises(ConfigError, match=r"'.*rn\.yaml' does not exist; did you mean '.*run\.yaml'\?"):
        load_config(tmp_path / "rn.yaml")
    with pytest.raises(ConfigError, match="must be a mapping of sections, got list"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match=r"is not valid YAML: expected ',' or ']', but got '<stream end>' at "
                                          r"line 2, column 1$"):
        load_config(write(tmp_path, "task: [sentiment\n"))


def test_resolved_yaml_round_trips() -> None:
    config = config_from_dict({"task": "arithmetic", "agent": {"name": "grpo", "clip": 0.2}},
                              ["rewards=[exact_match, {name: length, weight: 0.5}]"])
    assert config_from_dict(parse_yaml(config.to_yaml())) == config


def test_every_field_has_help_text() -> None:
    helps = field_help()
    assert "budget.updates" in helps and "agent.params" in helps
    assert {"threads", "reward_scale.normalize", "reward_scale.clip"} <= set(helps)
    assert all(text.split(": ", 1)[1] for text in helps.values())


@pytest.mark.parametrize("name", ["sentiment_ppo", "sentiment_reinforce", "arithmetic_grpo"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.model.name == "rlfb-tiny"


def test_reward_scale_and_threads_default_off_and_one_and_load_from_yaml(tmp_path: Path) -> None:
    default = RunConfig()
    assert (default.reward_scale.normalize, default.reward_scale.clip, default.threads) == (False, None, 1)
    config = load_config(write(tmp_path, "reward_scale: {normalize: true, clip: 5}\nthreads: null\n"))
    assert (config.reward_scale.normalize, config.reward_scale.clip, config.threads) == (True, 5.0, None)


def test_relative_dataset_paths_are_read_from_the_config_files_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configs = tmp_path / "project" / "configs"
    (configs / "data").mkdir(parents=True)
    path = configs / "run.yaml"
    path.write_text("task: {name: dataset, kwargs: {path: data/prompts.jsonl, eval_path: ../held_out.csv}}\n"
                    "rewards: [sentiment]\n")
    monkeypatch.chdir(tmp_path)  # the working directory is not the config's
    kwargs = load_config(path).task.kwargs
    assert kwargs["path"] == str(configs / "data" / "prompts.jsonl")
    assert kwargs["eval_path"] == str(configs / ".." / "held_out.csv")
    path.write_text("task: {name: dataset, kwargs: {path: stanfordnlp/imdb}}\nrewards: [sentiment]\n")
    assert load_config(path).task.kwargs["path"] == "stanfordnlp/imdb"  # a hub id is left alone
    assert load_config(path, ["task.kwargs.path=/abs/p.jsonl"]).task.kwargs["path"] == "/abs/p.jsonl"
    # A path typed on the command line is the working directory's, as a shell user expects.
    assert load_config(path, ["task.kwargs.path=here.jsonl"]).task.kwargs["path"] == str(tmp_path / "here.jsonl")


def test_a_config_without_rewards_uses_its_tasks_declared_defaults() -> None:
    assert [reward.name for reward in config_from_dict({"task": "arithmetic"}).rewards] == ["exact_match"]
    assert [reward.name for reward in config_from_dict({}).rewards] == ["sentiment"]  # the default task's
    multi_turn = config_from_dict({"task": "arithmetic", "env": {"kind": "multi_turn", "protocol": "calculator"}})
    assert multi_turn.rewards == []  # the protocol scores the episode
    listed = config_from_dict({"task": "arithmetic", "rewards": ["numeric_match"]})
    assert [reward.name for reward in listed.rewards] == ["numeric_match"]
    with pytest.raises(ConfigError, match="task 'dataset' declares no default reward; list at least one"):
        config_from_dict({"task": {"name": "dataset", "kwargs": {"path": "p.jsonl"}}})
    # An override that chooses the task or the env kind chooses the defaults too; one that sets rewards wins.
    assert [reward.name for reward in config_from_dict({}, ["task=arithmetic"]).rewards] == ["exact_match"]
    assert config_from_dict({"task": "arithmetic"}, ["env={kind: multi_turn, protocol: calculator}"]).rewards == []
    assert [reward.name for reward in config_from_dict({}, ["rewards=[length]"]).rewards] == ["length"]
