"""Small private helpers with no project dependencies beyond errors."""
