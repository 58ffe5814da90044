denylist bots { user_agent ~= "(?i)(bot|crawler"; }
