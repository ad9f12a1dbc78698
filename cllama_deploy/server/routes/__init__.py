"""HTTP routes. Thin: parse (pydantic), call a handler or the engine, return."""
