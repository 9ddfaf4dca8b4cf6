"""A trained run taken elsewhere: a Hugging Face ``GPT2LMHeadModel`` directory and back (``hf``,
``hf_tokenizer``), and the chatbot in one offline HTML page (``web``)."""
