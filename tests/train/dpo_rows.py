"""The tiny DPO runs' prompts and their short (chosen) and long (rejected) replies, shared by the DPO tests."""

QUESTIONS = ["Hello!", "Tell me a joke about cats.", "What is the capital of France?", "Write a short poem about the sea."]
SHORT = ["Hi.", "Cats nap.", "Paris.", "Waves."]
LONG = ["Hello! How can I help you today? Ask me anything at all.",
        "Cats sleep all day and judge you all night, the lazy brown cats.",
        "The capital of France is Paris, a city on the river, the capital.",
        "The sea, the waves and the wind write a short poem all night."]
