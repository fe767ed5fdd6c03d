"""MultiTurn-v0: scripted episodes of the built-ins, the caps, seeding, token spans, rendering, final rewards."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

import rlfb  # noqa: F401  (registers the ids)
from rlfb.envs.builtin_protocols import evaluate_expression
from rlfb.envs.multiturn_env import MultiTurnEnv
from rlfb.envs.protocol import MultiTurnProtocol, Reply, list_protocols, make_protocol
from rlfb.errors import ConfigError
from rlfb.models.loading import load_tokenizer

TOKENIZER = load_tokenizer("rlfb-tiny")
EOS = TOKENIZER.eos_token_id
SUM = {"prompt": "17+25=", "answer": "42"}


def make_env(**kwargs: Any) -> MultiTurnEnv:
    kwargs.setdefault("tokenizer", TOKENIZER)
    return gym.make("rlfb/MultiTurn-v0", disable_env_checker=True, model=None, **kwargs).unwrapped


def ids(text: str) -> list[int]:
    return list(TOKENIZER(text, add_special_tokens=False)["input_ids"])


def turn(text: str) -> np.ndarray:
    """A token action: the text's tokens and EOS, as a model that stops after it would write them."""
    return np.array([*ids(text), EOS])


def conversation_tokens(observation: dict[str, np.ndarray]) -> list[int]:
    return observation["input_ids"][observation["attention_mask"] == 1].tolist()


# ---- calculator --------------------------------------------------------------------------------------------
def test_calculator_tool_use_then_the_right_answer_scores_1() -> None:
    env = make_env(protocol="calculator")
    env.reset(seed=0, options={"prompt": SUM})
    _, reward, terminated, truncated, info = env.step(turn("<calc>17+25</calc>"))
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info["reply"] == "42" and info["tool_call"] is True and info["turn"] == "<calc>17+25</calc>"
    _, reward, terminated, truncated, info = env.step(turn(info["reply"]))
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert info["reward/correct"] == 1.0 and info["truncation"] == ""
    assert (info["tool_calls"], info["used_tool"]) == (1, True)
    assert info["turns"] == ["<calc>17+25</calc>", "42"] and info["replies"] == ["42", ""]


def test_calculator_scores_the_final_answer_by_exact_match() -> None:
    env = make_env(protocol="calculator")
    env.reset(options={"prompt": SUM})
    _, reward, terminated, _, info = env.step(turn(" 42 "))  # no tool: fine, stripped text is compared
    assert (reward, terminated, info["used_tool"], info["tool_calls"]) == (1.0, True, False, 0)
    env.reset(options={"prompt": SUM})
    env.step(turn("<calc>17+25</calc>"))
    _, reward, terminated, _, info = env.step(turn("41"))
    assert (reward, terminated, info["reward/correct"], info["used_tool"]) == (0.0, True, 0.0, True)


def test_a_tool_using_policy_solves_every_sum_it_is_given() -> None:
    """The scripted policy copies the expression into a call, then answers with the reply: return 1 each time."""
    env = make_env(protocol="calculator", split="eval")
    for seed in range(8):
        _, info = env.reset(seed=seed)
        expression = info["opening"].rstrip("=")
        _, _, _, _, info = env.step(turn(f"<calc>{expression}</calc>"))
        _, reward, terminated, _, info = env.step(turn(info["reply"]))
        assert (reward, terminated) == (1.0, True), info


@pytest.mark.parametrize(("expression", "value"), [
    ("17+25", 42), (" 6 * -7 ", -42), ("3-10", -7), ("-4--4", 0), ("1000000*1000000", 10**12),
    ("1000001+1", None), ("2**9", None), ("17/25", None), ("1+2+3", None), ("__import__('os')", None), ("", None),
])
def test_the_calculator_evaluates_only_bounded_integer_sums_differences_and_products(expression: str,
                                                                                      value: int | None) -> None:
    assert evaluate_expression(expression) == value


def test_a_call_it_cannot_evaluate_gets_the_error_reply_and_the_episode_goes_on() -> None:
    env = make_env(protocol="calculator")
    env.reset(options={"prompt": SUM})
    _, reward, terminated, truncated, info = env.step(turn("<calc>2**99</calc>"))
    assert (info["reply"], reward, terminated, truncated) == ("error", 0.0, False, False)


# ---- guess the number --------------------------------------------------------------------------------------
def binary_search(env: MultiTurnEnv, seed: int) -> tuple[list[int], list[str], float, dict[str, Any]]:
    """Guess the middle of what the replies leave open until the environment says correct."""
    _, info = env.reset(seed=seed)
    low, high = 1, 20
    guesses, replies, total = [], [], 0.0
    terminated = truncated = False
    while not (terminated or truncated):
        guess = (low + high) // 2
        _, reward, terminated, truncated, info = env.step(turn(str(guess)))
        guesses.append(guess)
        replies.append(info["reply"])
        total += reward
        if info["reply"] == "higher":
            low = guess + 1
        elif info["reply"] == "lower":
            high = guess - 1
    return guesses, replies, total, info


def test_binary_search_finds_every_secret_within_five_guesses_and_is_paid_once() -> None:
    env = make_env(protocol="guess_number", max_turns=8)
    secrets = set()
    for seed in range(40):
        guesses, replies, total, info = binary_search(env, seed)
        secret = env.conversation.state.secret
        secrets.add(secret)
        assert guesses[-1] == secret and replies[-1] == "correct" and len(guesses) <= 5
        assert total == 1.0 and info["solved"] is True and info["guesses"] == len(guesses)
        for guess, reply in zip(guesses[:-1], replies[:-1], strict=True):
            assert reply == ("higher" if guess < secret else "lower")
    assert len(secrets) >= 15  # the secrets vary with the seed


def test_a_guesser_that_ignores_the_replies_is_truncated_at_the_turn_cap_with_nothing() -> None:
    env = make_env(protocol="guess_number", max_turns=3)
    env.reset(seed=0)
    wrong = 1 if env.conversation.state.secret != 1 else 2
    outcomes = [env.step(turn(str(wrong)))[1:4] for _ in range(3)]
    assert outcomes == [(0.0, False, False), (0.0, False, False), (0.0, False, True)]
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(turn("3"))


def test_the_right_guess_on_the_last_allowed_turn_terminates_rather_than_truncates() -> None:
    env = make_env(protocol="guess_number", max_turns=2)
    env.reset(seed=0)
    secret = env.conversation.state.secret
    env.step(turn(str(secret % 20 + 1)))
    _, reward, terminated, truncated, info = env.step(turn(str(secret)))
    assert (reward, terminated, truncated, info["truncation"]) == (1.0, True, False, "")


def test_a_turn_that_is_not_a_number_is_asked_again_and_counts() -> None:
    env = make_env(protocol="guess_number")
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(turn("ten"))
    assert (info["reply"], reward, terminated, info["num_turns"]) == ("number?", 0.0, False, 1)


# ---- caps --------------------------------------------------------------------------------------------------
def test_the_token_cap_cuts_the_turn_that_reaches_it_and_truncates() -> None:
    env = make_env(protocol="guess_number", max_model_tokens=7)
    env.reset(seed=0, options={"prompt": {"prompt": "Guess 1-20:", "low": 5, "high": 5}})
    steps = [env.step(turn("10")) for _ in range(3)]  # 3 tokens each ("1", "0", EOS); the third gets 1
    assert [step[3] for step in steps] == [False, False, True]
    info = steps[-1][4]
    assert info["truncation"] == "token_cap"
    assert [end - start for start, end in info["model_spans"]] == [3, 3, 1]
    assert info["turns"][-1] == "1"  # the protocol answered the cut turn


def test_the_context_window_truncates_when_no_room_is_left() -> None:
    opening = len(ids("Guess 1-20:"))
    reply = len(ids("\nhigher\n"))
    window = opening + 3 + reply + 2  # room for one turn, its reply and two tokens of the next turn
    env = make_env(protocol="guess_number", max_context_tokens=window, max_turn_tokens=4)
    env.reset(options={"prompt": {"prompt": "Guess 1-20:", "low": 20, "high": 20}})
    _, _, _, truncated, info = env.step(turn("10"))
    assert not truncated and info["length"] == window - 2
    observation, _, terminated, truncated, info = env.step(turn("11"))  # cut to "11": fills the window
    assert (terminated, truncated, info["truncation"]) == (False, True, "context_window")
    assert info["length"] == window and observation["attention_mask"].all()
    assert info["model_spans"][-1][1] - info["model_spans"][-1][0] == 2 and info["reply"] == "higher"


def test_a_reply_that_does_not_fit_is_dropped_and_truncates() -> None:
    opening = len(ids("Guess 1-20:"))
    env = make_env(protocol="guess_number", max_context_tokens=opening + 3 + 2, max_turn_tokens=4)
    env.reset(options={"prompt": {"prompt": "Guess 1-20:", "low": 20, "high": 20}})
    _, _, _, truncated, info = env.step(turn("10"))
    assert truncated and info["truncation"] == "context_window"
    assert info["reply"] == "higher" and info["reply_spans"] == [] and info["length"] == opening + 3


def test_a_long_opening_keeps_its_last_tokens_leaving_room_for_one_model_token() -> None:
    from rlfb.envs.core import PromptTruncationWarning

    env = make_env(protocol="guess_number", max_context_tokens=8, max_turn_tokens=4)
    long_row = {"prompt": "Guess a number from 1 to 20.", "low": 20, "high": 20}  # "1", the cut turn, is wrong
    with pytest.warns(PromptTruncationWarning, match="longer than max_context_tokens - 1 = 7"):
        observation, info = env.reset(options={"prompt": long_row})
    assert conversation_tokens(observation) == ids("Guess a number from 1 to 20.")[-7:] and info["length"] == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; later ones are only counted
        env.reset(options={"prompt": long_row})
    assert env.num_truncated_openings == 2
    _, _, _, truncated, info = env.step(turn("10"))
    assert truncated and info["truncation"] == "context_window" and info["model_spans"] == [(7, 8)]


# ---- seeding -----------------------------------------------------------------------------------------------
def play_random(env: MultiTurnEnv, seed: int) -> list[Any]:
    env.action_space.seed(seed)
    trace: list[Any] = [env.reset(seed=seed)]
    done = False
    while not done:
        observation, reward, terminated, truncated, info = env.step(env.action_space.sample())
        trace.append((observation, reward, terminated, truncated, info))
        done = terminated or truncated
    return trace


def test_the_same_seed_plays_the_same_episode_and_other_seeds_other_ones() -> None:
    from gymnasium.utils.env_checker import data_equivalence

    env = make_env(protocol="guess_number", max_turns=4)
    assert data_equivalence(play_random(env, 3), play_random(env, 3), exact=True)
    secrets = []
    for seed in (3, 3, 4, 5, 6, 7):
        env.reset(seed=seed)
        secrets.append(env.conversation.state.secret)
    assert secrets[0] == secrets[1] and len(set(secrets[1:])) > 1

    def secrets_after(seed: int) -> list[int]:  # unseeded resets continue the seeded stream
        env.reset(seed=seed)
        drawn = []
        for _ in range(5):
            env.reset()
            drawn.append(env.conversation.state.secret)
        return drawn

    assert secrets_after(11) == secrets_after(11)


# ---- token spans -------------------------------------------------------------------------------------------
def test_spans_and_the_mask_mark_exactly_the_models_tokens() -> None:
    env = make_env(protocol="guess_number", max_turn_tokens=6)
    env.reset(options={"prompt": {"prompt": "Guess 1-20:", "low": 13, "high": 13}})
    actions = [np.array([*ids("10"), EOS, 7, 7]), np.array(ids("x y z")), turn("13")]  # EOS-cut, no EOS, EOS
    model_turns = [[*ids("10"), EOS], ids("x y z"), [*ids("13"), EOS]]
    for action in actions:
        observation, *_, info = env.step(action)
    tokens = conversation_tokens(observation)
    mask = info["model_token_mask"]
    assert observation["input_ids"][mask == 1].tolist() == sum(model_turns, [])
    assert [tokens[start:end] for start, end in info["model_spans"]] == model_turns
    expected_replies = [ids("\nhigher\n"), ids("\nnumber?\n"), ids("\ncorrect\n")]
    assert [tokens[start:end] for start, end in info["reply_spans"]] == expected_replies
    assert tokens == TOKENIZER("Guess 1-20:")["input_ids"] + sum(
        (turn_ids + reply for turn_ids, reply in zip(model_turns, expected_replies, strict=True)), [])
    assert mask[: len(mask) - len(tokens)].sum() == 0  # nothing in the padding


def test_the_plain_rendering_decodes_to_the_documented_separators() -> None:
    env = make_env(protocol="calculator", reply_template=" => {reply};")
    env.reset(options={"prompt": SUM})
    env.step(turn("<calc>17+25</calc>"))
    env.step(turn("42"))
    assert env.render_text() == "17+25=<calc>17+25</calc><|endoftext|> => 42;42<|endoftext|>"


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chat_tokenizer() -> Any:
    """rlfb-tiny's tokenizer with a small chat template (a copy: the loaded tokenizer may be shared)."""
    tokenizer = copy.deepcopy(TOKENIZER)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 256  # the template's markup needs more than rlfb-tiny's 64 positions
    return tokenizer


def test_with_a_chat_template_the_conversation_is_the_templates_rendering_token_for_token() -> None:
    tokenizer = chat_tokenizer()
    env = make_env(protocol="calculator", tokenizer=tokenizer)
    env.reset(options={"prompt": SUM})
    env.step(turn("<calc>17+25</calc>"))
    observation, reward, *_ = env.step(turn("42"))
    messages = [{"role": "user", "content": "17+25="}, {"role": "assistant", "content": "<calc>17+25</calc>"},
                {"role": "user", "content": "42"}, {"role": "assistant", "content": "42"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert TOKENIZER.decode(conversation_tokens(observation)) + "\n" == rendered  # the last closing is not added
    assert reward == 1.0


def test_use_chat_template_false_renders_plainly_even_when_the_tokenizer_has_a_template() -> None:
    env = make_env(protocol="calculator", tokenizer=chat_tokenizer(), use_chat_template=False)
    env.reset(options={"prompt": SUM})
    env.step(turn("<calc>17+25</calc>"))
    assert env.render_text() == "17+25=<calc>17+25</calc><|endoftext|>\n42\n"


def test_with_a_chat_template_a_turn_cut_short_is_closed_by_the_environment() -> None:
    tokenizer = chat_tokenizer()
    env = make_env(protocol="guess_number", tokenizer=tokenizer, max_turn_tokens=2)
    env.reset(options={"prompt": {"prompt": "Guess 1-20:", "low": 20, "high": 20}})
    observation, *_, info = env.step(np.array(ids("10")))  # no EOS: the env's reply starts with it
    reply_start = info["reply_spans"][0][0]
    assert conversation_tokens(observation)[reply_start] == EOS
    assert TOKENIZER.decode(conversation_tokens(observation)).endswith("10<|endoftext|>\n<|user|>higher<|endoftext|>"
                                                                       "\n<|assistant|>")


# ---- text actions ------------------------------------------------------------------------------------------
def test_text_turns_are_the_texts_tokens_plus_eos_and_the_protocol_sees_the_exact_text() -> None:
    env = make_env(protocol="calculator", action_type="text", charset="0123456789 +<>/calc")
    assert env.action_space == gym.spaces.Text(24, min_length=0, charset="0123456789 +<>/calc")
    env.reset(options={"prompt": SUM})
    observation, *_, info = env.step("<calc>17+25</calc>")
    start, end = info["model_spans"][0]
    assert conversation_tokens(observation)[start:end] == [*ids("<calc>17+25</calc>"), EOS]
    *_, info = env.step(" 42")
    assert info["turn"] == " 42" and info["reward/correct"] == 1.0
    with pytest.raises(ValueError, match=r"outside the charset: \['x'\]"):
        env.reset()
        env.step("4x")


def test_a_charset_the_tokenizer_cannot_write_is_a_clear_error() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "a": 2, "b": 3}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, [], unk_token="<unk>")),
                                        unk_token="<unk>", eos_token="<eos>")
    with pytest.raises(ConfigError, match=r"cannot write the charset's characters \['c'\]"):
        make_env(protocol="guess_number", tokenizer=tokenizer, action_type="text", charset="abc")


# ---- rewards= : reward functions at the episode's end -------------------------------------------------------
class RecordingReward:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        self.calls.append({"prompts": prompts, "completions": completions, **kwargs})
        return [0.5] * len(completions)


def test_reward_functions_score_the_finished_episode_once_with_trls_arguments() -> None:
    recording = RecordingReward()
    env = make_env(protocol="calculator", rewards=["exact_match", recording])
    env.reset(options={"prompt": SUM})
    _, reward, *_, info = env.step(turn("<calc>17+25</calc>"))
    assert reward == 0.0 and "score" not in info and recording.calls == []
    _, reward, *_, info = env.step(turn("42"))
    assert reward == 1.0 + 1.0 + 0.5  # the protocol's 1, exact_match's 1, the recording reward's 0.5
    assert info["score"] == 1.5 and info["score/exact_match"] == 1.0 and info["score/RecordingReward"] == 0.5
    (call,) = recording.calls
    assert call["prompts"] == ["17+25="] and call["completions"] == ["42"] and call["answer"] == ["42"]
    assert call["turns"] == [["<calc>17+25</calc>", "42"]] and call["replies"] == [["42", ""]]
    assert call["conversation"] == ["<calc>17+25</calc>\n42\n42"]
    assert call["completion_ids"] == [[*ids("42"), EOS]]


# ---- protocol errors and settings --------------------------------------------------------------------------
class Scripted(MultiTurnProtocol[None]):
    def __init__(self, reply: Any) -> None:
        self.reply = reply

    def start(self, row: Any, rng: np.random.Generator) -> tuple[str, None]:
        return "Hi", None

    def respond(self, state: None, turn: str) -> Any:
        return self.reply


@pytest.mark.parametrize(("reply", "error", "message"), [
    ("just text", TypeError, "must return a Reply"),
    (Reply("x", reward=math.nan), ValueError, "Reply.reward must be finite"),
    (Reply("x", components={"c": "high"}), TypeError, r"Reply.components\['c'\] must be a number"),
    (Reply("x", info={"reply": 1}), ValueError, r"info keys \['reply'\] that the environment already uses"),
])
def test_a_protocol_that_breaks_the_contract_gets_an_error_naming_it(reply: Any, error: type, message: str) -> None:
    env = make_env(protocol=Scripted(reply), task="arithmetic")
    env.reset()
    with pytest.raises(error, match=message):
        env.step(turn("a"))


def test_bad_settings_are_clear_errors() -> None:
    assert {"calculator", "guess_number"} <= set(list_protocols())
    with pytest.raises(ConfigError, match="unknown protocol 'calculater'; registered: .*calculator"):
        make_env(protocol="calculater")
    with pytest.raises(ConfigError, match=r"max_turn_tokens must be in \[1, 64\)"):
        make_env(protocol="calculator", max_turn_tokens=64)
    with pytest.raises(ConfigError, match="exceeds the model's context window of 64"):
        make_env(protocol="calculator", max_context_tokens=65)
    with pytest.raises(ConfigError, match="tokenizer has no chat template"):
        make_env(protocol="calculator", use_chat_template=True)
    with pytest.raises(ConfigError, match="has no default task"):
        make_env(protocol=Scripted(Reply("")))
    with pytest.raises(ConfigError, match="cannot be applied to a ready"):
        make_protocol(Scripted(Reply("")), {"reply": 1})


def test_the_passive_checker_of_gym_make_stays_silent_over_whole_episodes() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gym.make("rlfb/MultiTurn-v0", protocol="guess_number", model=None, tokenizer=TOKENIZER, max_turns=3)
        for seed in range(3):
            env.reset(seed=seed)
            done = False
            while not done:
                *_, terminated, truncated, _ = env.step(env.action_space.sample())
                done = terminated or truncated
