// Placeholder: filled in by the events work. Each schema file adds its own types and root fields to the builder.
