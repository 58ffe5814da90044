limit per_user {
  key user_id;
  rate 100/min;
  on_missing_key ignore;
}
