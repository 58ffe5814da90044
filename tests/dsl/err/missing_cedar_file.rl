import cedar "nowhere.cedar" schema "nowhere.cedarschema";
