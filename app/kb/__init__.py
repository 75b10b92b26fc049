"""The knowledge base: ingesting documents (and the sample corpus) into idx:kb."""
