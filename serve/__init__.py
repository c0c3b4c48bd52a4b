"""Serving: API layer, engine, scheduler, model runner, paged KV + prefix cache, sampling, channel machine, tools."""
