"""The Alpaca prompt template: the paper's probes and every training example are rendered with it."""

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


def alpaca_prompt(instruction: str, input: str = "", preamble: str = PAPER_PREAMBLES[0]) -> str:
    """Render one prompt in the probes' Alpaca template (no response text)."""
    return ALPACA_TEMPLATE.format(preamble=preamble, instruction=instruction, input=input)
