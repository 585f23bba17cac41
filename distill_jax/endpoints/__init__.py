"""Teachers behind an OpenAI-compatible API: `serve` puts a model behind one, `collect` reads
one into the black-box JSONL files that `data.name='jsonl'` trains from (docs/api_teachers.md).
"""
