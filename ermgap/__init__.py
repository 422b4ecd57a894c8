"""ermgap: fairness-aware (ERM-MinMaxGAP) fine-tuning of speech LLMs for emotion recognition."""

__version__ = "0.1.0"
