"""The reference teacher server: request validation, batching engine, aiohttp app."""
