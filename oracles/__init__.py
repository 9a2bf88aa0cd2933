"""Preference oracles: who decides which of two responses is better, and the ledger of what was paid for.

One job per module; the trainer and the batch sources see only the interface and the ledger.

- `oracles.base`: the interface (`Query`, `Judgment`, `Oracle.judge_many`).
- `oracles.ledger`: the `Ledger` of paid queries and `judge_with_budget`, which puts it and a hard
  budget in front of any oracle.
- `oracles.rules`: the rule judges for haikus and Jeopardy! (the rules themselves are in task_rules).
- `oracles.llm_judge`: the LLM judge over any OpenAI-compatible endpoint.
- `oracles.reward_model`: a local reward model (a sequence classifier with one output).
- `oracles.human`: people, a labelling round at a time (the run pauses until the answers are there).
- `oracles.build`: `build_oracle`, the construction from the `oracle` config group.

A failed judgment (winner None) is never a label: the caller drops and counts the pair.
"""
