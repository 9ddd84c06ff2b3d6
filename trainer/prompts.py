"""The text of every question cairl asks a model: SL-CAI critique/revision chats and the feedback question.

Everything here is a pure function from strings to chats (lists of {"role", "content"} messages)
or strings; the model's chat template is applied later, by whoever owns the tokenizer.

SL-CAI (one round, after few-shot demonstrations in the same format):
    user: <prompt>              assistant: <current answer>
    user: <critique request>    assistant: <critique>          <- generated
    user: <revision request>    assistant: <revision>          <- generated

AI feedback (multiple choice, scored by the log-probability of each option):
    user: Consider the following conversation between a human and an assistant:
          Human: ... Assistant: ...
          <comparison question>
          Options:
          (A) <answer A>
          (B) <answer B>
          Answer with (A) or (B).
    assistant: The answer is: (A) | (B)                          <- scored, not generated
"""

from __future__ import annotations

from collections.abc import Sequence

from trainer.constitution import Constitution, CritiqueExample, FeedbackExample, Message
from trainer.data.records import transcript_turns

Chat = list[dict[str, str]]

OPTION_LETTERS = tuple("ABCDEFGH")
ANSWER_PREFIX = "The answer is:"
COT_ANSWER_PREFIX = "\nSo the answer is:"

# Where a generated reply should end: the model starting the next turn of a transcript, or a label.
TURN_MARKERS = (
    "\nHuman:", "\nHUMAN:", "\nUser:", "\nUSER:", "\nAssistant:", "\nASSISTANT:",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "</s>",
    "CritiqueRequest:", "RevisionRequest:", "Critique request:", "Revision request:",
)
LEADING_LABELS = ("Critique:", "Revision:", "Assistant:", "Answer:", "Response:")


def options(count: int = 2) -> list[str]:
    """The scored continuations: ' (A)', ' (B)', ... (a leading space: they follow 'The answer is:')."""
    return [f" ({letter})" for letter in OPTION_LETTERS[:count]]


def _choices(count: int) -> str:
    labels = [f"({letter})" for letter in OPTION_LETTERS[:count]]
    return labels[0] if count == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]


def answer_instruction(count: int, chain_of_thought: bool) -> str:
    """The question's last line: answer directly, or reason step by step first."""
    if chain_of_thought:
        return f"Let's think step by step about which option is better, then give the answer as {_choices(count)}."
    return f"Answer with {_choices(count)}."


# -- messages -------------------------------------------------------------------------------------
def message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def as_chat(messages: Sequence[Message]) -> Chat:
    return [message(m.role, m.content) for m in messages]


def prompt_messages(text: str) -> Chat:
    """A prompt as chat messages: a 'Human: ... Assistant: ...' transcript (hh-rlhf) becomes its turns, anything else one user turn.

    The empty trailing 'Assistant:' that hh-rlhf prompts end with is dropped (the model writes that turn).
    """
    stripped = text.strip()
    if not stripped.startswith("Human:"):
        return [message("user", stripped)]
    roles = {"Human": "user", "Assistant": "assistant"}
    chat = [message(roles[speaker], body) for speaker, body in transcript_turns(stripped)[1]]
    while chat and not chat[-1]["content"]:
        chat.pop()
    return chat


def transcript(chat: Chat) -> str:
    """'Human: ...\\n\\nAssistant: ...' text of a conversation, for quoting it inside a question."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names[m['role']]}: {m['content'].strip()}" for m in chat)


# -- SL-CAI ---------------------------------------------------------------------------------------
def critique_example_turns(constitution: Constitution, example: CritiqueExample) -> Chat:
    """One few-shot demonstration: the conversation, then request/critique/request/revision turns."""
    critique_request, revision_request = constitution.example_requests(example)
    return as_chat(example.messages) + [
        message("user", critique_request),
        message("assistant", example.critique),
        message("user", revision_request),
        message("assistant", example.revision),
    ]


def critique_chat(conversation: Chat, response: str, critique_request: str, few_shot: Chat = ()) -> Chat:
    """Ask for a critique of `response` (the assistant's answer to `conversation`)."""
    return [*few_shot, *conversation, message("assistant", response), message("user", critique_request)]


def revision_chat(conversation: Chat, response: str, critique_request: str, critique: str, revision_request: str,
                  few_shot: Chat = ()) -> Chat:
    """Ask for a revision of `response`, after its critique."""
    return critique_chat(conversation, response, critique_request, few_shot) + [
        message("assistant", critique),
        message("user", revision_request),
    ]


def fresh_revision_chat(conversation: Chat, critique: str, revision_request: str) -> Chat:
    """Ask for the revision as a new answer to the conversation, with the request and critique as guidance.

    Small models asked for a revision after their own critique tend to repeat the critique; asked
    to answer afresh with that guidance they write an answer (revision_style: fresh).
    """
    guidance = f"{revision_request.strip()} Keep in mind this critique of an earlier reply: {critique.strip()}"
    return contrast_chat(conversation, guidance)


def direct_revision_chat(conversation: Chat, guidance: str, revision_request: str) -> Chat:
    """Ask for the revision as a new answer, guided by the constitution and the principle, without a critique.

    The CAI paper's "direct revision" ablation (§3.5): revising without first writing a critique.
    A 135M model's critiques are mostly off-topic or repeat its answer, and a revision guided by them
    refuses no more often than the answer it revises; one guided by the constitution does.
    """
    return contrast_chat(conversation, f"{guidance.strip()} {revision_request.strip()}".strip())


# -- AI feedback ----------------------------------------------------------------------------------
def comparison_question(conversation: Chat, answers: Sequence[str], comparison: str, chain_of_thought: bool = False) -> str:
    """The multiple-choice question: the conversation, the principle's question, the options (A), (B), ..."""
    lines = [
        "Consider the following conversation between a human and an assistant:",
        "",
        transcript(conversation),
        "",
        comparison.strip(),
        "Options:",
        *(f"({letter}) {answer.strip()}" for letter, answer in zip(OPTION_LETTERS, answers)),
        "",
        answer_instruction(len(answers), chain_of_thought),
    ]
    return "\n".join(lines)


def feedback_example_turns(constitution: Constitution, example: FeedbackExample, chosen_first: bool,
                           chain_of_thought: bool = False) -> Chat:
    """One few-shot judgement; `chosen_first` puts the better answer at (A), so examples can alternate."""
    answers = [example.chosen, example.rejected] if chosen_first else [example.rejected, example.chosen]
    letter = "A" if chosen_first else "B"
    question = comparison_question(as_chat(example.messages), answers, constitution.example_comparison(example), chain_of_thought)
    if chain_of_thought and example.reasoning:
        answer = f"{example.reasoning.strip()}{COT_ANSWER_PREFIX} ({letter})"
    else:
        answer = f"{ANSWER_PREFIX} ({letter})"
    return [message("user", question), message("assistant", answer)]


def feedback_few_shot(constitution: Constitution, count: int, chain_of_thought: bool = False) -> Chat:
    """The first `count` feedback examples, alternating the better answer between (A) and (B)."""
    turns: Chat = []
    for index, example in enumerate(constitution.feedback_examples[:count]):
        turns += feedback_example_turns(constitution, example, chosen_first=index % 2 == 1, chain_of_thought=chain_of_thought)
    return turns


def feedback_chat(question: str, few_shot: Chat = ()) -> Chat:
    return [*few_shot, message("user", question)]


def contrast_chat(conversation: Chat, instruction: str) -> Chat:
    """The conversation with `instruction` appended to its last user turn (contrastive feedback)."""
    if not conversation or conversation[-1]["role"] != "user":
        raise ValueError("contrast_chat: the conversation must end with a user turn")
    last = conversation[-1]
    return [*conversation[:-1], message("user", f"{last['content'].rstrip()}\n\n{instruction.strip()}")]


# -- cleaning generations -------------------------------------------------------------------------
def cut_at_markers(text: str, markers: Sequence[str] = TURN_MARKERS) -> str:
    """`text` up to the first marker (the model starting another turn), stripped."""
    cut = len(text)
    for marker in markers:
        index = text.find(marker)
        if 0 <= index < cut:
            cut = index
    return text[:cut].strip()


def strip_leading_label(text: str, labels: Sequence[str] = LEADING_LABELS) -> str:
    """'Revision: Sure...' -> 'Sure...' (models often echo the few-shot label)."""
    text = text.strip()
    changed = True
    while changed:
        changed = False
        for label in labels:
            if text.lower().startswith(label.lower()):
                text = text[len(label):].strip()
                changed = True
    return text


def clean_generation(text: str) -> str:
    """A generated reply without echoed labels and without anything after the model starts a new turn."""
    # The leading newline makes a reply that opens with "Human:" count as the model starting a new turn.
    return cut_at_markers("\n" + strip_leading_label(text))
