#pragma once
#include "kiln/dtype.h"
