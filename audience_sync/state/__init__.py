"""The state store: the only code that speaks SQL to the state database."""
