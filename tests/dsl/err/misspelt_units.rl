# A misspelt unit gets the closest unit, then the list.
limit a { match { route ANY "/a"; } rate 10/mni; }
limit b { match { route ANY "/b"; } rate 10/huor; }
limit c { match { route ANY "/c"; } rate 10/min; lease 30sce; }
limit d { match { route ANY "/d"; } rate 10/fortnight; }
