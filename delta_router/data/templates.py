"""Prompt templates: the paper's Alpaca template (probes and the default for training), and the other
prompt formats a finetune may have been trained with (``PROMPT_FORMATS``)."""

from __future__ import annotations

ALPACA_TEMPLATE = "{preamble}\n\n### Instruction:\n{instruction} Input:{input}\n\n### Response:"

PAPER_PREAMBLES: tuple[str, ...] = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.",
    "The task described below requires a response that completes the request accurately.",
    "Below is a description of a task. Provide a response that aligns with the requirements.",
    "The following instruction outlines a task. Generate a response that meets the specified request.",
    "You are given an instruction and input. Write a response that completes the task as requested.",
)

# "alpaca": the probes' template; "chat": the base's own chat template (ChatML when the tokenizer has
# none); "qa": a bare ``Question: ... Answer:`` prompt, as in OLMES / lm-eval multiple-choice tasks.
PROMPT_FORMATS = ("alpaca", "chat", "qa")
CHATML = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def alpaca_prompt(instruction: str, input: str = "", preamble: str = PAPER_PREAMBLES[0]) -> str:
    """Render one prompt in the probes' Alpaca template (no response text)."""
    return ALPACA_TEMPLATE.format(preamble=preamble, instruction=instruction, input=input)


def format_prompt(instruction: str, input: str, prompt_format: str = "alpaca", tokenizer=None) -> str:
    """One prompt (no response text) in ``prompt_format``; "chat" uses ``tokenizer``'s chat template."""
    if prompt_format == "alpaca":
        return alpaca_prompt(instruction, input)
    content = f"{instruction}\n{input}".strip()
    if prompt_format == "qa":
        return f"Question: {content}\nAnswer:"
    if prompt_format == "chat":
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": content}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return CHATML.format(content=content)
    raise ValueError(f"unknown prompt format {prompt_format!r}; known: {', '.join(PROMPT_FORMATS)}")
