"""Evaluation: suites that measure harmlessness, over-refusal, helpfulness, bias and preference
accuracy, with bootstrap CIs and deltas vs a baseline (`cairl eval`; the stages of `cairl train`).

    stats      bootstrap CIs, paired differences          refusal   phrase classifier
    judge      the AI judge (multiple choice, Llama Guard) bbq       BBQ bias-score math
    suites/    one module per suite                       data      prompt sets and local data
    results    typed per-item results                     report    eval.json, eval.md, plot
    sources    run stages as models                       local     in-process generation/scoring
"""
