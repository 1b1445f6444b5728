#include "fastcdc.h"
