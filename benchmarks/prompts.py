"""The prompts the batching benchmarks send: one list, importable without ``openai`` (gpu_check needs that)."""

PROMPTS = [
    "Write a short story about a lighthouse keeper and a storm.",
    "Explain how a bicycle stays upright.",
    "List five uses of a paperclip and explain each.",
    "Describe the water cycle to a ten-year-old.",
    "What are the main differences between cats and dogs as pets?",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue? Explain step by step.",
    "Write a friendly email inviting a colleague to lunch.",
    "Summarise the plot of a heist movie you invent.",
    "How do vaccines train the immune system?",
    "Plan a three-day trip to a mountain village.",
    "Explain recursion with a simple example.",
]
