"""HTTP routes by family: the OpenAI API, the seeds' simple APIs, and the server's own endpoints."""
